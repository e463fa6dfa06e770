//! One request stream → one handler: who may send what (the operator's admin identity, a
//! joined site, anyone with a `Hello`), and the answers to malformed or unexpected requests.
//!
//! Rule (DESIGN §5): every field of every peer message is validated before it is used — frame
//! size before allocation, `Hello` in `setup.rs` (classes, case count, histogram), an update's
//! header in `round.rs` (`check_header`, `check_metrics`) and its tensors in `aggregate.rs`
//! (`validate`: shapes, finiteness, owners, completeness, norm) — and a refusal names the site
//! and the field.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fedtalent_protocol::{
    close, read_frame, write_frame, AdminReply, AdminRequest, ErrorKind, FrameError, Held, Message, ModelRequest,
    RecvStream, SendStream, SiteStatus, StatusReport, MAX_FRAME_BYTES,
};
use tracing::warn;

use super::accept::{StreamSlot, MAX_STREAMS_PER_SITE};
use super::Coordinator;
use crate::config::ADMIN_IDENTITY;

/// How long a request frame may take to arrive once its stream is open.
const REQUEST_WAIT: Duration = Duration::from_secs(30);

impl Coordinator {
    pub(super) async fn handle_stream(self: Arc<Self>, peer: String, mut send: SendStream, mut recv: RecvStream) {
        let Some(_stream) = StreamSlot::take(&self, &peer) else {
            warn!(site = %peer, "refused a request: {MAX_STREAMS_PER_SITE} of its requests are already open");
            let reason = format!("site {peer}: more than {MAX_STREAMS_PER_SITE} concurrent requests");
            let _ = write_frame(&mut send, &Message::refusal(ErrorKind::BadMessage, reason)).await;
            let _ = send.finish();
            return;
        };
        let request = match tokio::time::timeout(REQUEST_WAIT, read_frame(&mut recv, MAX_FRAME_BYTES)).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                let _ = write_frame(&mut send, &refusal_of_frame_error(&peer, &e)).await;
                let _ = send.finish();
                return;
            }
            Err(_) => {
                warn!(site = %peer, "refused a request that did not arrive within {REQUEST_WAIT:?}");
                let _ = recv.stop(close::REFUSED);
                return;
            }
        };
        let is_admin = peer == ADMIN_IDENTITY;
        let member = is_admin || self.joined(&peer);
        let reply = match request {
            Message::Admin(req) if is_admin => Some(self.admin(req)),
            // The whole model (every site's heads and decoders) is the operator's only.
            Message::ModelRequest(ModelRequest { digest, full: true, held }) if is_admin => {
                self.model_reply(&peer, &digest, true, &held, &mut send).await
            }
            _ if is_admin => {
                Some(Message::refusal(ErrorKind::BadMessage, "the admin identity only sends admin requests"))
            }
            // The protocol version was checked by `read_frame` (see `refusal_of_frame_error`).
            Message::Hello(hello) => Some(self.hello(&peer, hello).await),
            Message::Heartbeat | Message::ModelRequest(_) | Message::UpdateHeader(_) | Message::SecAgg(_)
                if !member =>
            {
                warn!(site = %peer, "refused a {} request: the site has not joined", request.kind());
                let _ = recv.stop(close::REFUSED);
                Some(Message::refusal(
                    ErrorKind::NotAllowed,
                    format!("site {peer} has not joined this federation (no accepted Hello on this coordinator)"),
                ))
            }
            Message::Heartbeat => Some(self.poll(&peer).await),
            Message::ModelRequest(ModelRequest { full: true, .. }) => {
                warn!(site = %peer, "refused a request for the full model");
                Some(Message::refusal(
                    ErrorKind::NotAllowed,
                    format!("site {peer}: only the operator may download every site's heads (full = true)"),
                ))
            }
            Message::ModelRequest(ModelRequest { digest, full: false, held }) => {
                self.model_reply(&peer, &digest, false, &held, &mut send).await
            }
            Message::UpdateHeader(header) => Some(self.receive_update(&peer, header, &mut send, &mut recv).await),
            Message::SecAgg(request) => Some(self.secagg_request(&peer, request).await),
            other => Some(Message::refusal(ErrorKind::BadMessage, format!("unexpected {} request", other.kind()))),
        };
        if let Some(reply) = reply {
            if let Err(e) = write_frame(&mut send, &reply).await {
                warn!(site = %peer, "could not reply: {e}");
            }
        }
        let _ = send.finish();
    }

    /// Streams the model (from where the requester's `held` copy of a cut download ends), or
    /// the refusal to answer instead.
    async fn model_reply(
        &self,
        peer: &str,
        digest: &str,
        full: bool,
        held: &Held,
        send: &mut SendStream,
    ) -> Option<Message> {
        match self.send_model(peer, digest, full, held, send).await {
            Ok(()) => None,
            Err(reason) => {
                warn!(site = %peer, "model request refused: {reason:#}");
                Some(Message::refusal(ErrorKind::BadMessage, format!("{reason:#}")))
            }
        }
    }

    fn admin(&self, request: AdminRequest) -> Message {
        let reply = match request {
            AdminRequest::Status => AdminReply::Status(self.status()),
            AdminRequest::Launch { rounds } => {
                if rounds.is_some_and(|r| r != self.config.plan.rounds) {
                    AdminReply::Refused {
                        reason: "the number of rounds is fixed by federation.toml (the lr schedule depends on it)"
                            .into(),
                    }
                } else {
                    self.lock().launched = true;
                    self.changed();
                    AdminReply::Done { message: "rounds launched".into() }
                }
            }
            AdminRequest::Export { dir } => match self.export(Path::new(&dir)) {
                Ok(msg) => AdminReply::Done { message: msg },
                Err(e) => AdminReply::Refused { reason: format!("{e:#}") },
            },
            AdminRequest::SetAllowlist { sites } => {
                self.set_sites(&sites);
                AdminReply::Done { message: format!("allowlist is now {:?}", self.allowlist.names()) }
            }
        };
        Message::AdminReply(reply)
    }

    pub fn status(&self) -> StatusReport {
        let inner = self.lock();
        let federation = inner.running();
        let sites = self
            .config
            .federation
            .sites
            .iter()
            .map(|name| {
                let s = inner.sites.get(name);
                SiteStatus {
                    site: name.clone(),
                    connected: s.is_some_and(|s| !s.connections.is_empty()),
                    transport: s.and_then(|s| s.connections.values().next_back()).map(|c| c.kind()),
                    allowed: self.allowlist.contains(name),
                    last_round: s.and_then(|s| s.last_round),
                    n_cases: inner.registered_cases(name).unwrap_or(0),
                    last_train_loss: s.and_then(|s| s.last_loss),
                }
            })
            .collect();
        StatusReport {
            federation: self.config.federation.name.clone(),
            current_round: federation.map_or(0, |f| f.completed),
            total_rounds: self.config.plan.rounds_to_run(),
            running: federation.is_some_and(|f| f.open.is_some()),
            model_digest: federation.map(|f| f.digest.clone()).unwrap_or_default(),
            sites,
            dice: inner.last_dice.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        }
    }
}

/// The answer to a request that did not decode. A `Hello` of another protocol version is
/// recognised by the frame decoder even when the rest of it has another layout
/// ([`fedtalent_protocol::decode_payload`]); it is answered `VersionMismatch`, which the site
/// takes as final (retrying cannot help), where anything else malformed is `BadMessage`.
fn refusal_of_frame_error(peer: &str, e: &FrameError) -> Message {
    match e {
        FrameError::VersionMismatch { got, expected } => {
            warn!(site = %peer, version = got, "refused: protocol version {got}, this coordinator speaks {expected}");
            Message::refusal(
                ErrorKind::VersionMismatch,
                format!("site {peer}: protocol version {got} is not this coordinator's version {expected}"),
            )
        }
        e => {
            warn!(site = %peer, "refused a malformed request: {e}");
            Message::refusal(ErrorKind::BadMessage, format!("malformed request: {e}"))
        }
    }
}
