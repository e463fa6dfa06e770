//! Request streams over one TLS-over-TCP connection: the fallback transport of networks that
//! block UDP (issue 18). The TLS handshake is `fedtalent_certs::{tcp_connect, tcp_accept}`;
//! this module runs the federation's streams over the established TLS stream.
//!
//! QUIC gives every request its own stream; TCP is one ordered byte stream. Here a minimal
//! multiplexer gives one TLS connection the stream semantics the protocol uses from QUIC
//! (bidirectional streams opened by the site, FIN, STOP_SENDING, CONNECTION_CLOSE with a code
//! and reason, keep-alives and an idle timeout), so that the coordinator and the site agent run
//! the same request code over either transport. One TLS connection per request would have been
//! simpler, but costs a handshake (a signature and a chain verification at the coordinator, and
//! two round trips) per request, and leaves nothing that lives as long as a site's session: the
//! coordinator could not show a training site as connected, nor close a removed site's
//! connection with the reason, as it does over QUIC.
//!
//! Wire: frames of a 9-byte header, kind (u8), stream id (u32 BE), payload length (u32 BE), then
//! the payload:
//! * `OPEN` a stream (sent by the client when it opens one, so ids reach the server in order);
//! * `DATA` bytes of a stream, at most [`MAX_DATA`] per frame;
//! * `FIN` the sender's side of a stream is complete;
//! * `STOP` the receiver wants no more of a stream (payload: u64 code);
//! * `CLOSE` the connection ends (payload: u64 code, then the reason, at most 1 KiB);
//! * `PING` a keep-alive, every [`PING_EVERY`]; a connection that hears nothing for
//!   [`IDLE_TIMEOUT`] is lost (QUIC's keep-alive and idle timeout of the federation).
//!
//! Flow control: at most [`MAX_QUEUED`] DATA frames of a connection wait for its socket (a
//! writer waits beyond that; TCP's window is the backpressure toward the peer). The reader hands
//! a stream at most [`RECV_FRAMES`] frames its owner has not read, then stops reading the socket
//! until it does: one unread stream holds up the other streams of its connection (head-of-line
//! blocking, which QUIC's per-stream windows avoid). Memory stays bounded, and the protocol
//! cannot deadlock on it: every stream is read to its end or stopped (a stopped or dropped
//! stream's data is discarded), and a site has one request open at a time. A peer that stalls
//! its own streams stalls only its own connection.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter, ReadBuf};
use tokio::sync::{mpsc, watch, AcquireError, OwnedSemaphorePermit, Semaphore};

const OPEN: u8 = 0;
const DATA: u8 = 1;
const FIN: u8 = 2;
const STOP: u8 = 3;
const CLOSE: u8 = 4;
const PING: u8 = 5;

/// Largest payload of one DATA frame.
pub const MAX_DATA: usize = 64 << 10;
/// Largest close reason sent or accepted.
const MAX_REASON: usize = 1024;
/// DATA frames of one connection that may wait for its socket (4 MiB).
pub const MAX_QUEUED: usize = 64;
/// DATA frames the reader holds for one stream its owner has not read yet (4 MiB).
pub const RECV_FRAMES: usize = 64;
/// Streams the server side holds open at once on one connection (a site needs two or three).
pub const MAX_OPEN_STREAMS: usize = 64;
/// Keep-alive period (as QUIC's, [`fedtalent_certs`]' transport config: 5 s).
pub const PING_EVERY: Duration = Duration::from_secs(5);
/// A connection that hears nothing for this long is lost (as QUIC's idle timeout: 60 s).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a TLS-over-TCP connection ended.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TcpClosed {
    /// The peer closed it with a code and a reason.
    #[error("closed by the peer (code {code}): {reason}")]
    ByPeer { code: u64, reason: String },
    /// This side closed it.
    #[error("closed (code {code}): {reason}")]
    Locally { code: u64, reason: String },
    /// TLS refused it: an alert from the peer, or the peer's certificate here.
    #[error("TLS refused the connection: {0}")]
    Refused(String),
    /// It broke: reset, an end without a close frame, the idle timeout, a protocol error.
    #[error("connection lost: {0}")]
    Lost(String),
}

enum Out {
    Open(u32),
    Data {
        id: u32,
        bytes: Bytes,
        _permit: OwnedSemaphorePermit,
    },
    Fin(u32),
    Stop(u32, u64),
    Close(u64, Vec<u8>),
    /// The connection failed: the writer ends without a close frame.
    Abort,
}

enum In {
    Data(Bytes),
    Fin,
}

struct Entry {
    /// Where the reader delivers the stream's data; None once the receiving side is done.
    data: Option<mpsc::Sender<In>>,
    /// The peer's STOP code, once it stopped the stream.
    stopped: Arc<Mutex<Option<u64>>>,
    send_done: bool,
    recv_done: bool,
}

struct RawStream {
    id: u32,
    rx: mpsc::Receiver<In>,
    stopped: Arc<Mutex<Option<u64>>>,
}

struct State {
    streams: HashMap<u32, Entry>,
    /// Client: the next id to open. Server: the highest id opened by the peer.
    last_id: u32,
    /// Server: where new streams wait for `accept_bi`.
    accept: Option<mpsc::Sender<RawStream>>,
    closed: Option<TcpClosed>,
}

struct Shared {
    state: Mutex<State>,
    out: mpsc::UnboundedSender<Out>,
    queue: Arc<Semaphore>,
    shutdown: watch::Sender<bool>,
    accepted: tokio::sync::Mutex<mpsc::Receiver<RawStream>>,
    id: usize,
    remote: SocketAddr,
    server: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn closed(&self) -> Option<TcpClosed> {
        lock(&self.state).closed.clone()
    }

    /// Ends the connection with `why`: every stream fails, the writer sends `last` and stops.
    fn end(&self, why: TcpClosed, last: Out) {
        let streams = {
            let mut st = lock(&self.state);
            if st.closed.is_some() {
                return;
            }
            st.closed = Some(why);
            st.accept = None;
            std::mem::take(&mut st.streams)
        };
        drop(streams);
        self.queue.close();
        let _ = self.out.send(last);
        let _ = self.shutdown.send(true);
    }

    fn close(&self, code: u64, reason: &[u8]) {
        let reason = &reason[..reason.len().min(MAX_REASON)];
        let why = TcpClosed::Locally { code, reason: String::from_utf8_lossy(reason).into_owned() };
        self.end(why, Out::Close(code, reason.to_vec()));
    }

    fn remove_if_done(st: &mut State, id: u32) {
        if st.streams.get(&id).is_some_and(|e| e.send_done && e.recv_done) {
            st.streams.remove(&id);
        }
    }

    /// This side finished sending on `id` (FIN).
    fn local_fin(&self, id: u32) -> io::Result<()> {
        let mut st = lock(&self.state);
        if let Some(closed) = &st.closed {
            return Err(closed_error(closed));
        }
        if let Some(e) = st.streams.get_mut(&id) {
            e.send_done = true;
        }
        Self::remove_if_done(&mut st, id);
        let _ = self.out.send(Out::Fin(id));
        Ok(())
    }

    /// This side wants no more of `id` (STOP).
    fn local_stop(&self, id: u32, code: u64) {
        let mut st = lock(&self.state);
        if st.closed.is_some() {
            return;
        }
        if let Some(e) = st.streams.get_mut(&id) {
            e.recv_done = true;
            e.data = None;
        }
        Self::remove_if_done(&mut st, id);
        let _ = self.out.send(Out::Stop(id, code));
    }

    /// Where the reader delivers a frame of stream `id`; `None` for a stream this side is done
    /// receiving (the frame is discarded).
    fn incoming(&self, id: u32) -> Option<mpsc::Sender<In>> {
        lock(&self.state).streams.get(&id).and_then(|e| e.data.clone())
    }

    /// The peer opened stream `id` (server side).
    fn peer_opened(&self, id: u32) -> Result<(), TcpClosed> {
        let mut st = lock(&self.state);
        if !self.server || id <= st.last_id {
            return Err(TcpClosed::Lost(format!("protocol error: stream {id} opened out of order")));
        }
        if st.streams.len() >= MAX_OPEN_STREAMS {
            return Err(TcpClosed::Lost(format!("protocol error: more than {MAX_OPEN_STREAMS} open streams")));
        }
        st.last_id = id;
        let (tx, rx) = mpsc::channel(RECV_FRAMES);
        let stopped = Arc::new(Mutex::new(None));
        let entry = Entry { data: Some(tx), stopped: stopped.clone(), send_done: false, recv_done: false };
        st.streams.insert(id, entry);
        if let Some(accept) = &st.accept {
            if accept.try_send(RawStream { id, rx, stopped }).is_err() {
                return Err(TcpClosed::Lost(format!("more than {MAX_OPEN_STREAMS} streams not accepted")));
            }
        }
        Ok(())
    }

    fn peer_fin(&self, id: u32) {
        let mut st = lock(&self.state);
        if let Some(e) = st.streams.get_mut(&id) {
            e.recv_done = true;
            e.data = None;
        }
        Self::remove_if_done(&mut st, id);
    }

    fn peer_stopped(&self, id: u32, code: u64) {
        if let Some(e) = lock(&self.state).streams.get(&id) {
            *lock(&e.stopped) = Some(code);
        }
    }
}

fn closed_error(closed: &TcpClosed) -> io::Error {
    let kind = match closed {
        TcpClosed::Lost(_) => io::ErrorKind::ConnectionReset,
        _ => io::ErrorKind::ConnectionAborted,
    };
    io::Error::new(kind, closed.clone())
}

/// Closes the connection when the last handle (connection or stream) is dropped, as quinn does.
struct Handle(Arc<Shared>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.close(0, b"");
    }
}

/// One TLS-over-TCP connection carrying request streams (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct TcpConnection(Arc<Handle>);

/// Stable ids of TCP connections: high bit set, so that they never equal a quinn `stable_id`
/// (an address) in a map that holds both.
static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

impl TcpConnection {
    /// The site's end, over an established TLS stream.
    pub fn client<S: AsyncRead + AsyncWrite + Send + 'static>(io: S, remote: SocketAddr) -> TcpConnection {
        Self::start(io, remote, false)
    }

    /// The coordinator's end, over an accepted TLS stream.
    pub fn server<S: AsyncRead + AsyncWrite + Send + 'static>(io: S, remote: SocketAddr) -> TcpConnection {
        Self::start(io, remote, true)
    }

    fn start<S: AsyncRead + AsyncWrite + Send + 'static>(io: S, remote: SocketAddr, server: bool) -> TcpConnection {
        let (rd, wr) = tokio::io::split(io);
        let (out, out_rx) = mpsc::unbounded_channel();
        let (accept, accepted) = mpsc::channel(MAX_OPEN_STREAMS);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            state: Mutex::new(State { streams: HashMap::new(), last_id: 0, accept: Some(accept), closed: None }),
            out,
            queue: Arc::new(Semaphore::new(MAX_QUEUED)),
            shutdown,
            accepted: tokio::sync::Mutex::new(accepted),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed) | (1 << (usize::BITS - 1)),
            remote,
            server,
        });
        tokio::spawn(write_loop(wr, out_rx));
        tokio::spawn(read_loop(rd, shared.clone(), shutdown_rx));
        TcpConnection(Arc::new(Handle(shared)))
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.0 .0
    }

    /// Opens a bidirectional stream (the client side opens, the server accepts).
    pub fn open_bi(&self) -> Result<(TcpSendStream, TcpRecvStream), TcpClosed> {
        let shared = self.shared();
        let mut st = lock(&shared.state);
        if let Some(closed) = &st.closed {
            return Err(closed.clone());
        }
        st.last_id += 1;
        let id = st.last_id;
        let (tx, rx) = mpsc::channel(RECV_FRAMES);
        let stopped = Arc::new(Mutex::new(None));
        st.streams.insert(id, Entry { data: Some(tx), stopped: stopped.clone(), send_done: false, recv_done: false });
        // Under the lock: ids reach the wire in order.
        let _ = shared.out.send(Out::Open(id));
        drop(st);
        Ok(self.wrap(RawStream { id, rx, stopped }))
    }

    /// The next stream the peer opened.
    pub async fn accept_bi(&self) -> Result<(TcpSendStream, TcpRecvStream), TcpClosed> {
        let raw = self.shared().accepted.lock().await.recv().await;
        match raw {
            Some(raw) => Ok(self.wrap(raw)),
            None => Err(self.close_reason().unwrap_or_else(|| TcpClosed::Lost("accept queue closed".into()))),
        }
    }

    fn wrap(&self, raw: RawStream) -> (TcpSendStream, TcpRecvStream) {
        let send =
            TcpSendStream { conn: self.0.clone(), id: raw.id, stopped: raw.stopped, acquiring: None, finished: false };
        let recv =
            TcpRecvStream { conn: self.0.clone(), id: raw.id, rx: raw.rx, buf: Bytes::new(), fin: false, done: false };
        (send, recv)
    }

    /// Closes the connection with `code` and `reason` (sent to the peer, at most 1 KiB).
    pub fn close(&self, code: u64, reason: &[u8]) {
        self.shared().close(code, reason);
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<TcpClosed> {
        self.shared().closed()
    }

    /// An id unique among this process's connections (TCP and QUIC).
    pub fn stable_id(&self) -> usize {
        self.shared().id
    }

    pub fn remote_address(&self) -> SocketAddr {
        self.shared().remote
    }
}

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// The sending side of a stream. Dropped without [`TcpSendStream::finish`], it finishes the
/// stream (as a quinn `SendStream` does).
pub struct TcpSendStream {
    conn: Arc<Handle>,
    id: u32,
    stopped: Arc<Mutex<Option<u64>>>,
    acquiring: Option<Acquire>,
    finished: bool,
}

impl TcpSendStream {
    fn shared(&self) -> &Arc<Shared> {
        &self.conn.0
    }

    fn check(&self) -> io::Result<()> {
        if let Some(code) = *lock(&self.stopped) {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, format!("stream stopped by the peer (code {code})")));
        }
        if let Some(closed) = self.shared().closed() {
            return Err(closed_error(&closed));
        }
        if self.finished {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "write after finish"));
        }
        Ok(())
    }

    fn poll_permit(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<OwnedSemaphorePermit>> {
        let queue = self.shared().queue.clone();
        let acquiring = self.acquiring.get_or_insert_with(|| Box::pin(queue.acquire_owned()));
        let permit = ready!(acquiring.as_mut().poll(cx));
        self.acquiring = None;
        Poll::Ready(
            permit
                .map_err(|_| closed_error(&self.shared().closed().unwrap_or_else(|| TcpClosed::Lost("closed".into())))),
        )
    }

    fn push(&self, bytes: Bytes, permit: OwnedSemaphorePermit) -> io::Result<()> {
        self.check()?;
        let _ = self.shared().out.send(Out::Data { id: self.id, bytes, _permit: permit });
        Ok(())
    }

    /// Writes `bytes` without copying them (the writer task holds them until they are sent).
    pub async fn write_shared(&mut self, mut bytes: Bytes) -> io::Result<()> {
        while !bytes.is_empty() {
            self.check()?;
            let permit = std::future::poll_fn(|cx| self.poll_permit(cx)).await?;
            let part = bytes.split_to(bytes.len().min(MAX_DATA));
            self.push(part, permit)?;
        }
        Ok(())
    }

    /// Ends the stream: the peer reads its end after the bytes written so far.
    pub fn finish(&mut self) -> io::Result<()> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        self.shared().local_fin(self.id)
    }
}

impl Drop for TcpSendStream {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

impl AsyncWrite for TcpSendStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.check()?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let permit = ready!(self.poll_permit(cx))?;
        let n = buf.len().min(MAX_DATA);
        self.push(Bytes::copy_from_slice(&buf[..n]), permit)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The writer task flushes the socket whenever it has nothing more queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.finish())
    }
}

/// The receiving side of a stream. Dropped before its end, it stops the stream (as a quinn
/// `RecvStream` does).
pub struct TcpRecvStream {
    conn: Arc<Handle>,
    id: u32,
    rx: mpsc::Receiver<In>,
    buf: Bytes,
    fin: bool,
    /// Stopped by this side.
    done: bool,
}

impl TcpRecvStream {
    /// Tells the peer to stop sending (its writes fail with `code`); what it sent is discarded.
    pub fn stop(&mut self, code: u64) {
        if self.fin || self.done {
            return;
        }
        self.done = true;
        self.rx.close();
        self.conn.0.local_stop(self.id, code);
    }
}

impl Drop for TcpRecvStream {
    fn drop(&mut self) {
        self.stop(0);
    }
}

impl AsyncRead for TcpRecvStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.buf.is_empty() {
                let n = self.buf.len().min(out.remaining());
                out.put_slice(&self.buf.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if self.fin {
                return Poll::Ready(Ok(()));
            }
            if self.done {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "read after stop")));
            }
            match ready!(self.rx.poll_recv(cx)) {
                Some(In::Data(bytes)) => self.buf = bytes,
                Some(In::Fin) => self.fin = true,
                None => {
                    let closed = self.conn.0.closed().unwrap_or_else(|| TcpClosed::Lost("stream reset".into()));
                    return Poll::Ready(Err(closed_error(&closed)));
                }
            }
        }
    }
}

fn header(kind: u8, id: u32, len: usize) -> [u8; 9] {
    let mut h = [0u8; 9];
    h[0] = kind;
    h[1..5].copy_from_slice(&id.to_be_bytes());
    h[5..9].copy_from_slice(&(len as u32).to_be_bytes());
    h
}

/// Writes one queued item; `Ok(false)` when the writer is done (close sent, or aborted).
async fn write_item<W: AsyncWrite + Unpin>(w: &mut BufWriter<W>, item: Out) -> io::Result<bool> {
    match item {
        Out::Open(id) => w.write_all(&header(OPEN, id, 0)).await?,
        Out::Data { id, bytes, _permit } => {
            w.write_all(&header(DATA, id, bytes.len())).await?;
            w.write_all(&bytes).await?;
        }
        Out::Fin(id) => w.write_all(&header(FIN, id, 0)).await?,
        Out::Stop(id, code) => {
            w.write_all(&header(STOP, id, 8)).await?;
            w.write_all(&code.to_be_bytes()).await?;
        }
        Out::Close(code, reason) => {
            w.write_all(&header(CLOSE, 0, 8 + reason.len())).await?;
            w.write_all(&code.to_be_bytes()).await?;
            w.write_all(&reason).await?;
            w.flush().await?;
            w.shutdown().await?;
            return Ok(false);
        }
        Out::Abort => return Ok(false),
    }
    Ok(true)
}

async fn write_loop<W: AsyncWrite + Unpin>(wr: W, mut rx: mpsc::UnboundedReceiver<Out>) {
    let mut w = BufWriter::with_capacity(2 * MAX_DATA, wr);
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result: io::Result<()> = async {
        loop {
            let mut item = tokio::select! {
                item = rx.recv() => match item { Some(item) => item, None => return Ok(()) },
                _ = ping.tick() => {
                    w.write_all(&header(PING, 0, 0)).await?;
                    w.flush().await?;
                    continue;
                }
            };
            // Everything queued goes out before one flush.
            loop {
                if !write_item(&mut w, item).await? {
                    return Ok(());
                }
                match rx.try_recv() {
                    Ok(next) => item = next,
                    Err(_) => break,
                }
            }
            w.flush().await?;
        }
    }
    .await;
    if let Err(e) = result {
        // The reader sees the connection fail too, with the peer's reason if it sent one.
        tracing::debug!("TCP connection writer: {e}");
    }
}

/// Reads one frame: `Ok(None)` at a clean end before a frame.
async fn read_frame<R: AsyncRead + Unpin>(rd: &mut R) -> io::Result<Option<(u8, u32, Bytes)>> {
    let mut h = [0u8; 9];
    let first = rd.read(&mut h[..1]).await?;
    if first == 0 {
        return Ok(None);
    }
    rd.read_exact(&mut h[1..]).await?;
    let (kind, id, len) = (
        h[0],
        u32::from_be_bytes(h[1..5].try_into().unwrap()),
        u32::from_be_bytes(h[5..9].try_into().unwrap()) as usize,
    );
    let max = match kind {
        DATA => MAX_DATA,
        STOP => 8,
        CLOSE => 8 + MAX_REASON,
        OPEN | FIN | PING => 0,
        _ => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("protocol error: frame kind {kind}"))),
    };
    if len > max || (kind == STOP && len != 8) || (kind == CLOSE && len < 8) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("protocol error: frame kind {kind} of {len} bytes"),
        ));
    }
    let mut payload = vec![0u8; len];
    rd.read_exact(&mut payload).await?;
    Ok(Some((kind, id, Bytes::from(payload))))
}

async fn read_loop<R: AsyncRead + Unpin>(mut rd: R, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let why = loop {
        let frame = tokio::select! {
            _ = shutdown.changed() => return,
            frame = tokio::time::timeout(IDLE_TIMEOUT, read_frame(&mut rd)) => frame,
        };
        let (kind, id, payload) = match frame {
            Err(_) => break TcpClosed::Lost(format!("nothing heard for {IDLE_TIMEOUT:?}")),
            Ok(Err(e)) => match fedtalent_certs::tls_refusal(&e) {
                Some(refusal) => break TcpClosed::Refused(refusal),
                None => break TcpClosed::Lost(e.to_string()),
            },
            Ok(Ok(None)) => break TcpClosed::Lost("the peer ended the connection without closing it".into()),
            Ok(Ok(Some(frame))) => frame,
        };
        match kind {
            PING => {}
            OPEN => {
                if let Err(why) = shared.peer_opened(id) {
                    break why;
                }
            }
            DATA | FIN => {
                if let Some(tx) = shared.incoming(id) {
                    let item = if kind == DATA { In::Data(payload) } else { In::Fin };
                    // Waits while the stream's owner has RECV_FRAMES unread (see the module docs);
                    // a stop or drop of the stream ends the wait.
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        _ = tx.send(item) => {}
                    }
                }
                if kind == FIN {
                    shared.peer_fin(id);
                }
            }
            STOP => shared.peer_stopped(id, u64::from_be_bytes(payload[..8].try_into().unwrap())),
            CLOSE => {
                let code = u64::from_be_bytes(payload[..8].try_into().unwrap());
                break TcpClosed::ByPeer { code, reason: String::from_utf8_lossy(&payload[8..]).into_owned() };
            }
            _ => unreachable!("read_frame refuses other kinds"),
        }
    };
    shared.end(why, Out::Abort);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn pair() -> (TcpConnection, TcpConnection) {
        let (a, b) = tokio::io::duplex(256 << 10);
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        (TcpConnection::client(a, addr), TcpConnection::server(b, addr))
    }

    #[tokio::test]
    async fn streams_carry_bytes_both_ways_and_end() {
        let (client, server) = pair();
        // Each stream served by a task of its own, as the coordinator does.
        let echo = tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut send, mut recv)) = server.accept_bi().await {
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    recv.read_to_end(&mut got).await.unwrap();
                    send.write_all(&got).await.unwrap();
                    send.finish().unwrap();
                });
                n += 1;
            }
            (n, server.close_reason())
        });
        // Concurrent streams of several sizes, one larger than every buffer on the way.
        let sizes = [0usize, 1, MAX_DATA, 10 << 20];
        let tasks: Vec<_> = sizes
            .iter()
            .map(|&len| {
                let (mut send, mut recv) = client.open_bi().unwrap();
                tokio::spawn(async move {
                    let payload: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
                    let writer = async {
                        send.write_all(&payload).await.unwrap();
                        send.finish().unwrap();
                    };
                    let mut back = Vec::new();
                    let ((), read) = tokio::join!(writer, recv.read_to_end(&mut back));
                    read.unwrap();
                    assert_eq!(back, payload, "stream of {len} bytes");
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        client.close(7, b"bye");
        let (n, reason) = echo.await.unwrap();
        assert_eq!(n, sizes.len());
        assert_eq!(reason, Some(TcpClosed::ByPeer { code: 7, reason: "bye".into() }));
        assert!(lock(&client.shared().state).streams.is_empty());
    }

    #[tokio::test]
    async fn a_stop_fails_the_writer_and_a_close_fails_the_reader() {
        let (client, server) = pair();
        let (mut send, _recv) = client.open_bi().unwrap();
        send.write_all(b"header").await.unwrap();
        let (_s, mut r) = server.accept_bi().await.unwrap();
        let mut buf = [0u8; 6];
        r.read_exact(&mut buf).await.unwrap();
        r.stop(1);
        // The writer keeps writing until it hears of the stop, then fails.
        let chunk = vec![0u8; MAX_DATA];
        let err = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Err(e) = send.write_all(&chunk).await {
                    return e;
                }
            }
        })
        .await
        .unwrap();
        assert!(err.to_string().contains("stopped by the peer (code 1)"), "{err}");
        // A close with a reason reaches a reader waiting on another stream.
        let (_send, mut recv) = client.open_bi().unwrap();
        let (_s2, _r2) = server.accept_bi().await.unwrap();
        server.close(1, b"site x was removed");
        let err = recv.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert!(err.to_string().contains("site x was removed"), "{err}");
        assert_eq!(client.close_reason(), Some(TcpClosed::ByPeer { code: 1, reason: "site x was removed".into() }));
        assert!(client.open_bi().is_err());
    }

    #[tokio::test]
    async fn dropping_every_handle_closes_the_connection() {
        let (client, server) = pair();
        drop(client);
        let err = server.accept_bi().await.err().unwrap();
        assert_eq!(err, TcpClosed::ByPeer { code: 0, reason: String::new() });
    }
}
