//! Feeds arbitrary bytes to the cabinet frame decoder, as a stream: decode until the buffer is
//! exhausted or framing is lost. Oracle: no panic; a framing error consumes nothing; every
//! decoded frame re-encodes to bytes that decode to the same frame.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use protocol::cabinet::{self, MAX_PAYLOAD_LEN};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the receive limit, so small pre-login limits are exercised too.
    let Some((&limit, data)) = data.split_first() else { return };
    let max = if limit < 128 { 256 } else { MAX_PAYLOAD_LEN };
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match cabinet::decode(&mut buf, max) {
            Ok(Some(frame)) => {
                let mut wire = BytesMut::new();
                cabinet::encode(&frame, &mut wire).expect("a decoded frame re-encodes");
                let again = cabinet::decode(&mut wire, MAX_PAYLOAD_LEN).expect("re-decodes");
                assert_eq!(again.as_ref(), Some(&frame));
                assert!(wire.is_empty());
            }
            Ok(None) => break,
            Err(e) if e.is_fatal() => {
                assert_eq!(buf.len(), before, "a framing error consumes nothing");
                break;
            }
            Err(_) => assert!(buf.len() < before, "a rejected frame is consumed"),
        }
    }
});
