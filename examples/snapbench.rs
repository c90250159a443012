//! Snapshotter latency micro-benchmark used by `scripts/bench --containerd`:
//! CALLERS concurrent callers each run N rounds of Prepare (on PARENT) +
//! Mounts + Remove over containerd's Snapshots gRPC API, and one JSON
//! line gives the median and p90 latency of each call and of the round.
//!
//! Usage: snapbench SOCKET SNAPSHOTTER PARENT N CALLERS [LEASE]
//!
//! SOCKET is either containerd's socket (SNAPSHOTTER names the snapshotter,
//! `overlayfs` or `thinfs`; requests carry the namespace `default`) or a
//! snapshotter's own socket (SNAPSHOTTER `-`: the calls reach thinfs
//! directly, so Remove includes deleting the device). Through containerd,
//! LEASE (`ctr leases create`) keeps its garbage collector, which a Remove
//! starts, from collecting another caller's fresh snapshot.

use containerd_snapshots::api::snapshots::v1::snapshots_client::SnapshotsClient;
use containerd_snapshots::api::snapshots::v1::{
    MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
};
use std::time::Instant;

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    (v[i] * 100.0).round() / 100.0
}

fn req<T>(body: T, namespaced: bool, lease: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(body);
    if namespaced {
        r.metadata_mut().insert(
            "containerd-namespace",
            tonic::metadata::MetadataValue::from_static("default"),
        );
    }
    if let Ok(v) = lease.parse() {
        r.metadata_mut().insert("containerd-lease", v);
    }
    r
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 6 && a.len() != 7 {
        eprintln!("usage: snapbench SOCKET SNAPSHOTTER PARENT N CALLERS [LEASE]");
        std::process::exit(2);
    }
    let sock = std::path::PathBuf::from(&a[1]);
    let (name, namespaced) = match a[2].as_str() {
        "-" => (String::new(), false),
        n => (n.to_string(), true),
    };
    let parent = a[3].clone();
    let n: usize = a[4].parse()?;
    let callers: usize = a[5].parse()?;
    let lease = a.get(6).cloned().unwrap_or_default();
    let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_| {
            tokio::net::UnixStream::connect(sock.clone())
        }))
        .await?;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..callers {
        let mut client = SnapshotsClient::new(channel.clone());
        let (name, parent, lease) = (name.clone(), parent.clone(), lease.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<[f64; 3]> = Vec::new();
            for i in 0..n {
                let key = format!("snapbench-{}-{c}-{i}", std::process::id());
                let t0 = Instant::now();
                client
                    .prepare(req(
                        PrepareSnapshotRequest {
                            snapshotter: name.clone(),
                            key: key.clone(),
                            parent: parent.clone(),
                            labels: Default::default(),
                        },
                        namespaced,
                        &lease,
                    ))
                    .await?;
                let t1 = Instant::now();
                client
                    .mounts(req(
                        MountsRequest {
                            snapshotter: name.clone(),
                            key: key.clone(),
                        },
                        namespaced,
                        &lease,
                    ))
                    .await?;
                let t2 = Instant::now();
                client
                    .remove(req(
                        RemoveSnapshotRequest {
                            snapshotter: name.clone(),
                            key,
                        },
                        namespaced,
                        &lease,
                    ))
                    .await?;
                let t3 = Instant::now();
                let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
                lat.push([ms(t0, t1), ms(t1, t2), ms(t2, t3)]);
            }
            Ok::<_, tonic::Status>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let wall = t.elapsed().as_secs_f64();
    let col = |i: usize| all.iter().map(|l| l[i]).collect::<Vec<f64>>();
    let (mut p, mut m, mut r) = (col(0), col(1), col(2));
    let mut round: Vec<f64> = all.iter().map(|l| l.iter().sum()).collect();
    println!(
        "{{\"callers\":{callers},\"rounds\":{},\"prepare_ms\":{},\"prepare_p90_ms\":{},\"mounts_ms\":{},\"remove_ms\":{},\"round_ms\":{},\"round_p90_ms\":{},\"rounds_per_s\":{:.1}}}",
        all.len(),
        pct(&mut p, 0.5),
        pct(&mut p, 0.9),
        pct(&mut m, 0.5),
        pct(&mut r, 0.5),
        pct(&mut round, 0.5),
        pct(&mut round, 0.9),
        all.len() as f64 / wall
    );
    Ok(())
}
