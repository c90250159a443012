//! Helper process for the crash tests in `fs-tests/root_engine.rs`: opens
//! the pool in a state directory and runs one engine operation. The tests
//! set `THINFS_FAILPOINT` so that the process SIGKILLs itself midway.
//!
//! Usage: crash_child STATE OP ARGS...
//!   create NAME | snapshot NAME SNAP | clone NAME@SNAP NEW |
//!   destroy TARGET | rollback NAME@SNAP | write NAME FILE CONTENT

use std::io::Write;
use thinfs::engine::{Engine, PoolOptions, Target};
use thinfs::types::{Bytes, Name};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let mut o = PoolOptions::new(std::path::PathBuf::from(&a[1]));
    o.pool_size = Bytes(8 << 30);
    o.reserve = Some(Bytes(128 << 20));
    o.default_image_size = Bytes(1 << 30);
    let e = match Engine::open_pool(&o) {
        Ok(e) => e,
        Err(err) => {
            eprintln!("open: {err}");
            std::process::exit(3);
        }
    };
    let n = |s: &str| Name::new(s).expect("name");
    let r = match a[2].as_str() {
        "create" => e.create_image(&n(&a[3]), None).map(|_| ()),
        "snapshot" => {
            let id = e.image_id(&n(&a[3])).expect("meta").expect("image");
            // Mount it so that the freeze path runs too.
            let _m = e.mount(id).expect("mount");
            e.snapshot(id, &n(&a[4])).map(|_| ())
        }
        "clone" => e
            .clone_snapshot(&Target::parse(&a[3]).expect("target"), &n(&a[4]))
            .map(|_| ()),
        "destroy" => e.destroy(&Target::parse(&a[3]).expect("target"), true),
        "rollback" => e.rollback(&Target::parse(&a[3]).expect("target"), true),
        "write" => {
            let id = e.image_id(&n(&a[3])).expect("meta").expect("image");
            let m = e.mount(id).expect("mount");
            let fd = thinfs::sys::file::openat(
                m.root(),
                a[4].as_ref(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
                0o644,
            )
            .expect("create");
            let mut f = std::fs::File::from(fd);
            f.write_all(a[5].as_bytes()).expect("write");
            f.sync_all().expect("fsync");
            println!("fsynced");
            std::io::stdout().flush().ok();
            // Die without any cleanup, as kill -9 would.
            // SAFETY: kill(2) on our own pid.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            Ok(())
        }
        op => {
            eprintln!("unknown op {op}");
            std::process::exit(2);
        }
    };
    if let Err(err) = r {
        eprintln!("{}: {err}", a[2]);
        std::process::exit(1);
    }
}
