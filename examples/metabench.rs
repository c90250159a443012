//! Metadata micro-benchmark used by `scripts/bench`: create, stat and
//! unlink N empty files in DIR; prints one JSON line with files/s per phase.
//!
//! Usage: metabench DIR N [PHASES]
//!
//! PHASES is a comma-separated subset of `create,stat,unlink` (default: all
//! three, in that order, plus `total`); `scripts/bench` runs one phase at a
//! time when it counts the FUSE requests of each.

use std::time::Instant;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 3 && a.len() != 4 {
        eprintln!("usage: metabench DIR N [create,stat,unlink]");
        std::process::exit(2);
    }
    let dir = std::path::PathBuf::from(&a[1]);
    let n: usize = a[2].parse().expect("N");
    let phases: Vec<&str> = a
        .get(3)
        .map(|s| s.split(',').collect())
        .unwrap_or_else(|| vec!["create", "stat", "unlink"]);
    let names: Vec<_> = (0..n).map(|i| dir.join(format!("f{i:06}"))).collect();
    let mut out = Vec::new();
    let mut secs = 0.0;
    for phase in &phases {
        let t = Instant::now();
        for p in &names {
            match *phase {
                "create" => drop(std::fs::File::create(p).expect("create")),
                "stat" => drop(std::fs::metadata(p).expect("stat")),
                "unlink" => std::fs::remove_file(p).expect("unlink"),
                other => {
                    eprintln!("metabench: unknown phase {other}");
                    std::process::exit(2);
                }
            }
        }
        let s = t.elapsed().as_secs_f64();
        secs += s;
        out.push(format!("\"{phase}\":{:.0}", n as f64 / s));
    }
    if phases.len() == 3 {
        out.push(format!("\"total\":{:.0}", n as f64 / secs));
    }
    println!("{{{}}}", out.join(","));
}
