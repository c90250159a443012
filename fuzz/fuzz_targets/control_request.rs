//! A control request line, decoded in the daemon's two steps (a JSON
//! value, then the typed request), and a cancel line.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
        && let Ok(r) = serde_json::from_value::<thinfs::daemon::proto::Request>(v)
    {
        let _ = (r.op.summary(), r.op.fds(), r.op.is_change());
    }
    let _ = serde_json::from_slice::<thinfs::daemon::proto::ClientLine>(data);
});
