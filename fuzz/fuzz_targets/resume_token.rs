//! Resume tokens: any text is a token or a clean refusal.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let _ = thinfs::stream::ResumeToken::parse(&s);
    let _ = thinfs::stream::ResumeToken::open(&s, &[7; 32]);
});
