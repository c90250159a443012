//! A backup file (its trailer, index and section hashes): verified or
//! cleanly refused. The input is the file; it is written to one scratch
//! file per process, reused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::{Seek, Write};

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static F: std::cell::RefCell<std::fs::File> = std::cell::RefCell::new({
            let p = std::env::temp_dir().join(format!("thinfs-fuzz-backup-{}", std::process::id()));
            let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
            let _ = std::fs::remove_file(&p);
            f
        });
    }
    F.with(|f| {
        let mut f = f.borrow_mut();
        f.set_len(0).unwrap();
        f.rewind().unwrap();
        f.write_all(data).unwrap();
        let _ = thinfs::service::verify_file(&mut f, |_| {});
    });
});
