//! Metadata micro-benchmark used by `scripts/bench`: create, stat and
//! unlink N empty files in DIR; prints one JSON line with files/s per phase.
//!
//! Usage: metabench DIR N

use std::time::Instant;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 3 {
        eprintln!("usage: metabench DIR N");
        std::process::exit(2);
    }
    let dir = std::path::PathBuf::from(&a[1]);
    let n: usize = a[2].parse().expect("N");
    let names: Vec<_> = (0..n).map(|i| dir.join(format!("f{i:06}"))).collect();
    let t = Instant::now();
    for p in &names {
        std::fs::File::create(p).expect("create");
    }
    let create = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for p in &names {
        std::fs::metadata(p).expect("stat");
    }
    let stat = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for p in &names {
        std::fs::remove_file(p).expect("unlink");
    }
    let unlink = t.elapsed().as_secs_f64();
    let f = |s: f64| n as f64 / s;
    println!(
        "{{\"create\":{:.0},\"stat\":{:.0},\"unlink\":{:.0},\"total\":{:.0}}}",
        f(create),
        f(stat),
        f(unlink),
        (3 * n) as f64 / (create + stat + unlink) / 3.0
    );
}
