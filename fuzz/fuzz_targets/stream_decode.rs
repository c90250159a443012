//! The send stream decoder: any bytes are a stream or a clean refusal.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(mut d) = thinfs::stream::Decoder::new(data) {
        while let Ok(Some(_)) = d.next() {}
    }
});
