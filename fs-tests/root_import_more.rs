//! Root tests of `thinfs import` and `export` beyond root_backup's: zstd
//! tarballs (by magic bytes, on stdin too; export to `.tar.zst` and
//! `--zstd`), damaged zstd, sparse files made by GNU tar `--sparse` (GNU
//! and PAX 1.0 forms, holes kept), an unreadable source file, and a full
//! pool during an import: a clear error and nothing left behind.

mod common;

use common::tree::*;
use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use thinfs::engine::{BackendChoice, Engine, PoolOptions};
use thinfs::types::Bytes;

/// The CLI's stderr.
fn err(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Names of every image and snapshot.
fn names(m: &TestMount) -> String {
    ok(&m.cli(&["list", "-t", "all", "-H", "-o", "name"]))
}

/// Run `thinfs ARGS` through `sh -c` (for pipes and redirections).
fn cli_pipe(m: &TestMount, script: &str) -> std::process::Output {
    Command::new("sh")
        .arg("-c")
        .arg(script.replace("THINFS", &thinfs_bin().display().to_string()))
        .env("THINFS_SOCKET", m.socket())
        .output()
        .unwrap()
}

/// A source tree with every file type, owners, modes, times, xattrs, ACLs.
fn make_source(dir: &Path) {
    sh(&format!(
        "set -e; cd {}
         mkdir -p dir/sub empty && echo hello > dir/sub/f
         head -c 2000000 /dev/urandom > dir/random && seq 1 100000 > text
         echo link > a && ln a dir/a2 && ln -s ../a dir/rel && ln -s /nowhere abs
         mkfifo fifo && mknod cdev c 1 3 && mknod bdev b 7 200
         chown 1234:5678 dir/sub/f && chmod 4750 dir/sub/f && chmod 1777 dir/sub
         chown -h 42:43 abs && chmod 2710 empty
         setfattr -n user.colour -v blue dir/sub/f && setfattr -n trusted.t -v s text
         setfacl -m u:1000:rwx,g:2000:r dir/random && setfacl -d -m u:1000:rx dir
         touch -h -d '2001-02-03 04:05:06.123456789' abs dir/sub/f cdev
         touch -d '1999-12-31 23:59:59.5' dir/sub empty",
        dir.display()
    ));
}

/// After the daemon stopped: the pool's backend devices are exactly those
/// of its records (no hidden device of a failed import is left).
fn no_hidden_devices(m: &mut TestMount, want: usize) {
    m.stop();
    let e = open(m.scratch.path());
    let mut devs: Vec<u32> = e.records().unwrap().iter().map(|r| r.dev.get()).collect();
    devs.sort();
    let mut back: Vec<u32> = e
        .backend()
        .list()
        .unwrap()
        .iter()
        .map(|d| d.get())
        .collect();
    back.sort();
    assert_eq!(devs.len(), want, "{devs:?}");
    assert_eq!(devs, back, "hidden devices left");
}

#[test]
fn root_import_more_zstd_tarballs_in_and_out() {
    let mut m = TestMount::start("impz");
    let s = Scratch::new("impz-src");
    let src = s.path().join("src");
    std::fs::create_dir(&src).unwrap();
    make_source(&src);
    let tar = s.path().join("src.tar");
    sh(&format!(
        "tar -c --xattrs --xattrs-include='*' --acls --numeric-owner -f {} -C {} .",
        tar.display(),
        src.display()
    ));
    // A .tar.zst made by zstd(1), from a file.
    let zst = s.path().join("src.tar.zst");
    sh(&format!("zstd -q -o {} {}", zst.display(), tar.display()));
    let o = m.cli(&["import", "zimg", zst.to_str().unwrap()]);
    ok(&o);
    compare_trees(&src, &m.path("zimg"));
    // By its magic bytes, not its name: on stdin, in two frames.
    let o = cli_pipe(
        &m,
        &format!(
            "(head -c 100000 {t} | zstd -q -c; tail -c +100001 {t} | zstd -q -c) | THINFS import --size 300M zpipe - -q",
            t = tar.display()
        ),
    );
    ok(&o);
    compare_trees(&src, &m.path("zpipe"));
    // Export to .tar.zst (by its name), and --zstd to stdout: zstd data
    // that imports as the same tree.
    let out = s.path().join("out.tar.zst");
    ok(&m.cli(&["export", "zimg@import", "-q", "-o", out.to_str().unwrap()]));
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(&bytes[..4], &[0x28, 0xb5, 0x2f, 0xfd], "not zstd");
    assert!(bytes.len() < std::fs::metadata(&tar).unwrap().len() as usize);
    sh(&format!("zstd -q -t {}", out.display()));
    ok(&m.cli(&["import", "back", out.to_str().unwrap(), "-q"]));
    compare_trees(&src, &m.path("back"));
    let piped = s.path().join("piped.bin");
    ok(&cli_pipe(
        &m,
        &format!("THINFS export zimg --zstd -q > {}", piped.display()),
    ));
    let o = cli_pipe(
        &m,
        &format!("zstd -dc {} | tar -t | sort | head -3", piped.display()),
    );
    assert_eq!(ok(&o), "a\nabs\nbdev\n");
    // Cut or damaged zstd: refused, saying so, nothing left.
    let mut bad = bytes.clone();
    let mid = bad.len() / 2;
    for b in &mut bad[mid..mid + 64] {
        *b ^= 0x5a;
    }
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("cut", bytes[..bytes.len() / 2].to_vec(), "truncated"),
        ("cutend", bytes[..bytes.len() - 3].to_vec(), "truncated"),
        ("damaged", bad, "zstd"),
    ];
    for (tag, data, why) in cases {
        let p = s.path().join(format!("{tag}.tar.zst"));
        std::fs::write(&p, data).unwrap();
        let o = m.cli(&["import", tag, p.to_str().unwrap()]);
        assert!(!o.status.success(), "{tag}: must fail");
        let e = err(&o);
        eprintln!("{tag}: {e}");
        assert!(e.contains("zstd") && e.contains(why), "{tag}: {e}");
        assert!(e.contains("nothing was imported"), "{tag}: {e}");
        assert!(!names(&m).contains(tag), "{tag}: {}", names(&m));
    }
    no_hidden_devices(&mut m, 6);
}

#[test]
fn root_import_more_sparse_files_keep_their_holes() {
    let m = TestMount::start("imps");
    let s = Scratch::new("imps-src");
    let src = s.path().join("src");
    std::fs::create_dir(&src).unwrap();
    // 64 MiB files with a few data islands (the GNU form holds up to 4
    // segments in its header), one ending in a hole; whole-second times
    // (the GNU form has no nanoseconds).
    sh(&format!(
        "set -e; cd {}
         truncate -s 64M a b
         printf start | dd of=a conv=notrunc status=none
         head -c 100000 /dev/urandom | dd of=a bs=1M seek=20 conv=notrunc status=none
         head -c 5000 /dev/urandom | dd of=b bs=4096 seek=3000 conv=notrunc status=none
         echo plain > plain
         touch -d @1000000000 a b plain .",
        src.display()
    ));
    for (tag, fmt) in [("gnu", "--format=gnu"), ("pax", "--format=pax")] {
        let tar = s.path().join(format!("{tag}.tar"));
        sh(&format!(
            "tar -c -S {fmt} -f {} -C {} .",
            tar.display(),
            src.display()
        ));
        // It is a sparse archive: far smaller than the files.
        assert!(std::fs::metadata(&tar).unwrap().len() < 1 << 20);
        let o = m.cli(&["import", tag, tar.to_str().unwrap()]);
        ok(&o);
        compare_trees(&src, &m.path(tag));
        for f in ["a", "b"] {
            let md = std::fs::metadata(m.path(&format!("{tag}/{f}"))).unwrap();
            assert_eq!(md.len(), 64 << 20, "{tag}/{f}");
            assert!(
                md.blocks() * 512 < 1 << 20,
                "{tag}/{f}: the holes were written ({} blocks)",
                md.blocks()
            );
        }
        // No GNUSparseFile.0 directory of PAX's stand-in names.
        assert!(!m.path(&format!("{tag}/GNUSparseFile.0")).exists());
    }
}

#[test]
fn root_import_more_unreadable_source_file_is_named() {
    let mut m = TestMount::start("impu");
    let s = Scratch::new("impu-src");
    let src = s.path().join("src");
    std::fs::create_dir(&src).unwrap();
    sh(&format!(
        "set -e; cd {} && mkdir d && echo ok > d/fine && echo secret > d/locked && chmod 000 d/locked",
        src.display()
    ));
    // Root without the capabilities that bypass read rights: the walk
    // meets a file it cannot read (the daemon still sees uid 0).
    let o = Command::new("setpriv")
        .args([
            "--bounding-set=-dac_override,-dac_read_search",
            "--inh-caps=-all",
        ])
        .arg(thinfs_bin())
        .args(["import", "u", src.to_str().unwrap()])
        .env("THINFS_SOCKET", m.socket())
        .output()
        .unwrap();
    assert!(!o.status.success(), "must fail: {}", err(&o));
    let e = err(&o);
    eprintln!("unreadable: {e}");
    assert!(e.contains("d/locked"), "the file is not named: {e}");
    assert!(
        e.contains("ermission denied") || e.contains("EACCES"),
        "{e}"
    );
    assert!(names(&m).trim().is_empty(), "{}", names(&m));
    no_hidden_devices(&mut m, 0);
}

/// A daemon on a fresh 2G reflink pool (see root_space.rs: the pool is
/// made again, smaller, between two starts).
fn small_pool(tag: &str) -> TestMount {
    let mut m = TestMount::start(tag);
    m.stop();
    assert!(wait_no_loops(m.scratch.path()).is_empty());
    std::fs::remove_dir_all(&m.state).unwrap();
    let mut o = PoolOptions::new(&m.state);
    o.backend = BackendChoice::Reflink;
    o.pool_size = Bytes(2 << 30);
    o.reserve = Some(Bytes(64 << 20));
    o.default_image_size = Bytes(10 << 30);
    drop(Engine::open_pool(&o).expect("make a 2G pool"));
    m.spawn();
    m
}

fn pool(m: &TestMount) -> serde_json::Value {
    serde_json::from_str(&ok(&m.cli(&["pool", "--json"]))).unwrap()
}

#[test]
fn root_import_more_full_pool_leaves_nothing() {
    let mut m = small_pool("impfull");
    ok(&m.cli(&["create", "a", "--size", "4G"]));
    // Fill the pool but for about 500 MiB.
    let avail = pool(&m)["available"].as_u64().unwrap();
    let fill = (avail - (500 << 20)) >> 20;
    sh(&format!(
        "head -c {fill}M /dev/urandom > {} && sync",
        m.path("a/fill").display()
    ));
    std::thread::sleep(std::time::Duration::from_secs(1));
    let before = pool(&m)["used"].as_u64().unwrap();
    let avail = pool(&m)["available"].as_u64().unwrap();
    assert!(avail < 700 << 20, "the pool was not filled: {}", pool(&m));
    // A tar stream of 1.2 GiB of random data on stdin, into a 4G image:
    // the pool runs out first.
    let o = cli_pipe(
        &m,
        "python3 -c \"import tarfile, sys\n\
         t = tarfile.open(fileobj=sys.stdout.buffer, mode='w|')\n\
         i = tarfile.TarInfo('big'); i.size = 1200 << 20\n\
         t.addfile(i, open('/dev/urandom', 'rb'))\n\
         t.close()\" | THINFS import --size 4G big -",
    );
    assert!(!o.status.success(), "the import must not fit");
    let e = err(&o);
    eprintln!("full pool: {e}");
    assert!(e.contains("pool"), "{e}");
    assert!(
        e.contains("No space") || e.contains("full") || e.contains("ENOSPC"),
        "{e}"
    );
    assert!(!names(&m).contains("big"), "{}", names(&m));
    // The pool's space comes back (the hidden device is deleted).
    let after = std::cell::Cell::new(0);
    wait_event(
        || format!("pool used {before} before, {} after", after.get()),
        || {
            after.set(pool(&m)["used"].as_u64().unwrap());
            after.get() <= before + (32 << 20)
        },
    );
    // Image a is intact and the pool still works.
    assert_eq!(
        std::fs::metadata(m.path("a/fill")).unwrap().len(),
        fill << 20
    );
    ok(&m.cli(&["create", "c", "--size", "1G"]));
    no_hidden_devices(&mut m, 2);
}

#[test]
fn root_import_more_many_small_files_fit_the_sized_image() {
    // 90,000 empty files: a 45 MB tarball. Sized from its length alone
    // (x 4 x 1.5 + 256M: a 532M image, one inode per 16 KiB) the image
    // ran out of inodes after about 34,000 of them.
    let m = TestMount::start("impmany");
    let s = Scratch::new("impmany-src");
    let tar = s.path().join("many.tar");
    let py = format!(
        "import tarfile\n\
         t = tarfile.open('{}', 'w', format=tarfile.GNU_FORMAT)\n\
         for i in range(90000):\n    t.addfile(tarfile.TarInfo(f'd{{i // 1000}}/f{{i % 1000}}'))\n\
         t.close()\n",
        tar.display()
    );
    let o = Command::new("python3").arg("-c").arg(&py).output().unwrap();
    assert!(o.status.success(), "{}", err(&o));
    let o = m.cli(&["import", "many", tar.to_str().unwrap()]);
    ok(&o);
    let n: usize = (0..90)
        .map(|d| {
            std::fs::read_dir(m.path(&format!("many/d{d}")))
                .unwrap()
                .count()
        })
        .sum();
    assert_eq!(n, 90000);
}
