#![no_main]
//! Frame/message decoder: any input gives an error or a message that re-encodes canonically;
//! never a panic, never an allocation beyond the cap.
use fedtalent_protocol::{decode_frame, decode_payload, encode_frame, MAX_FRAME_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_payload(data);
    if let Ok(m) = decode_frame(data, MAX_FRAME_BYTES) {
        let again = encode_frame(&m, MAX_FRAME_BYTES).expect("a decoded message re-encodes");
        let m2 = decode_frame(&again, MAX_FRAME_BYTES).expect("re-encoded frame decodes");
        // NaN floats compare unequal; compare the encodings instead.
        assert_eq!(again, encode_frame(&m2, MAX_FRAME_BYTES).unwrap());
    }
});
