//! The space guard's thread: every [`TICK`] it samples the pool and every
//! writable live mount, sets each ext4's `reserved_clusters` to its share
//! of the budget ([`plan`]), gives the pool-state warnings, and repairs an
//! image whose ext4 reported errors once it is no longer mounted.

use super::*;

/// The guard's thread; stops (and joins) on [`SpaceGuard::stop`] or drop.
#[derive(Debug)]
pub struct SpaceGuard {
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
    repairs: Arc<parking_lot::Mutex<HashMap<DeviceId, Repair>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the guard's thread has done, for tests.
#[derive(Debug, Default)]
struct Counts {
    /// Ticks run.
    ticks: AtomicU64,
    /// Ticks that sampled at least one containerd device.
    layer_ticks: AtomicU64,
}

impl SpaceGuard {
    /// Start guarding the pool of `engine`.
    pub fn start(engine: Arc<Engine>) -> Result<SpaceGuard> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let counts = Arc::new(Counts::default());
        let c = counts.clone();
        let repairs: Arc<parking_lot::Mutex<HashMap<DeviceId, Repair>>> = Arc::default();
        let r = repairs.clone();
        let thread = std::thread::Builder::new()
            .name("space".into())
            .spawn(move || {
                let mut w = Watcher {
                    repairs: r,
                    ..Watcher::default()
                };
                engine.guard_pulse.set_running(true);
                while !s.load(Ordering::Relaxed) {
                    if w.tick(&engine) {
                        c.layer_ticks.fetch_add(1, Ordering::Relaxed);
                    }
                    c.ticks.fetch_add(1, Ordering::Relaxed);
                    engine.guard_pulse.tick_done(w.tight);
                    w.repair_unmounted(&engine);
                    std::thread::sleep(TICK);
                }
                engine.guard_pulse.set_running(false);
            })
            .ctx(|| "start the space guard thread".into())?;
        Ok(SpaceGuard {
            stop,
            counts,
            repairs,
            thread: Some(thread),
        })
    }

    /// Ticks the guard has run: it advances every [`TICK`] unless the
    /// thread is stuck.
    pub fn ticks(&self) -> u64 {
        self.counts.ticks.load(Ordering::Relaxed)
    }

    /// Ticks that sampled at least one of containerd's devices (mounted
    /// by someone else, found in the mount tables).
    pub fn layer_ticks(&self) -> u64 {
        self.counts.layer_ticks.load(Ordering::Relaxed)
    }

    /// Stop the thread and wait for it, and for repairs under way (up to
    /// a minute).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while self.repairs.lock().values().any(|r| *r == Repair::Running)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for SpaceGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Repair of an image that reported ext4 errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repair {
    /// Waiting for the image to be unmounted.
    Pending,
    /// e2fsck is running (in its own thread).
    Running,
}

#[derive(Debug, Default)]
struct Watcher {
    tracked: HashMap<DeviceId, Tracked>,
    shapes: HashMap<DeviceId, Option<(u64, bool)>>,
    layer_mounts: LayerMounts,
    last: HashMap<DeviceId, Sample>,
    ticks: u64,
    repairs: Arc<parking_lot::Mutex<HashMap<DeviceId, Repair>>>,
    /// Highest warning given: 0 none, 80, 90, 100 (full).
    warned: u8,
    /// Whether the last plan's budget was below [`TIGHT_BUDGET`].
    tight: bool,
}

impl Watcher {
    /// One look at the pool; true if it sampled a containerd device.
    fn tick(&mut self, engine: &Engine) -> bool {
        let st = match engine.backend.status() {
            Ok(s) => s,
            Err(e) => {
                log::debug!("space guard: pool status: {e}");
                return false;
            }
        };
        // Records change rarely: read them once a second (the margin
        // covers a snapshot taken in between).
        self.ticks += 1;
        if self.ticks.is_multiple_of(40) {
            self.shapes.clear();
        }
        // An image whose free blocks did not change since the last tick
        // keeps its sample, at most 200 ms old.
        let fresh = self.ticks.is_multiple_of(8);
        let shapes = &mut self.shapes;
        let last = &self.last;
        let samples = engine.space_samples(
            |id| *shapes.entry(id).or_insert_with(|| engine.space_shape(id)),
            |id, sysfs, bfree| {
                last.get(&id)
                    .filter(|s| !fresh && s.sysfs == sysfs && s.bfree == bfree)
                    .cloned()
            },
            &mut self.layer_mounts,
        );
        shapes.retain(|id, _| samples.iter().any(|s| s.id == *id));
        self.last = samples.iter().map(|s| (s.id, s.clone())).collect();
        // Forget unmounted images, (re)learn new or remounted ones.
        self.tracked
            .retain(|id, t| samples.iter().any(|s| s.id == *id && s.sysfs == t.sysfs));
        for s in &samples {
            self.tracked.entry(s.id).or_insert_with(|| {
                log::debug!(
                    "space guard: now guarding {} id {} ({}): {} bytes in use at first sight",
                    if s.layer {
                        "containerd snapshot"
                    } else {
                        "image"
                    },
                    s.id,
                    s.sysfs.display(),
                    s.used
                );
                Tracked {
                    sysfs: s.sysfs.clone(),
                    meta0: s.backed as i64 - s.used as i64,
                    default_resv: read_u64(&s.sysfs.join("reserved_clusters")).unwrap_or(4096),
                    last_used: s.used,
                    written_resv: None,
                    warned_errors: false,
                }
            });
        }
        let tracked = &self.tracked;
        let p = plan(
            st.total,
            st.available,
            &samples,
            |id| tracked.get(&id).map(|t| t.meta0),
            |id, used| tracked.get(&id).map(|t| used > t.last_used).unwrap_or(true),
        );
        for (s, (_, allowed)) in samples.iter().zip(&p.allowed) {
            let Some(t) = self.tracked.get_mut(&s.id) else {
                continue;
            };
            let want = s
                .bfree
                .saturating_sub(allowed / s.bsize)
                .max(t.default_resv);
            if t.written_resv != Some(want) {
                match std::fs::write(t.sysfs.join("reserved_clusters"), want.to_string()) {
                    Ok(()) => t.written_resv = Some(want),
                    // Unmounted since the sample (a container that just
                    // ended): nothing left to guard, nothing to warn of.
                    // ENOENT if the directory went before the open, ENODEV
                    // if it went between the open and the write (sysfs
                    // neither waits for nor retries a removed attribute).
                    Err(e)
                        if e.kind() == std::io::ErrorKind::NotFound
                            || e.raw_os_error() == Some(libc::ENODEV) =>
                    {
                        log::debug!(
                            "space guard: {} went away before its reserve was set",
                            t.sysfs.display()
                        )
                    }
                    Err(e) => log::warn!(
                        "space guard: cannot set {}/reserved_clusters to {want}: {e}",
                        t.sysfs.display()
                    ),
                }
            }
            t.last_used = s.used;
            if s.errors > 0 && !t.warned_errors {
                t.warned_errors = true;
                let rec = engine.record(s.id).ok();
                let name = rec
                    .as_ref()
                    .map(|r| engine.log_name(r))
                    .unwrap_or_else(|| format!("id {}", s.id));
                if s.layer {
                    // containerd mounted it: only containerd can unmount
                    // it, and a removed snapshot takes its errors along.
                    let key = rec
                        .and_then(|r| r.containerd)
                        .map(|c| c.key)
                        .unwrap_or_default();
                    log::error!(
                        "containerd snapshot {name} ({}): ext4 reports {} error(s) ({})",
                        crate::types::escape(&crate::types::cut(&key, crate::types::MAX_SHOWN)),
                        s.errors,
                        t.sysfs.display()
                    );
                    continue;
                }
                log::error!(
                    "image {name}: ext4 reports {} error(s) ({}; a journal aborted by a failed write turns it read-only); it will be repaired (e2fsck -fy) when it is next unmounted",
                    s.errors,
                    t.sysfs.display()
                );
                self.repairs.lock().entry(s.id).or_insert(Repair::Pending);
            }
        }
        self.tight = p.budget < TIGHT_BUDGET;
        self.warn(&p, st.total, st.available);
        samples.iter().any(|s| s.layer)
    }

    /// Start `e2fsck -fy` on images that reported errors and are no longer
    /// mounted, each in its own thread (the guard keeps ticking).
    fn repair_unmounted(&mut self, engine: &Arc<Engine>) {
        let ready: Vec<DeviceId> = self
            .repairs
            .lock()
            .iter()
            .filter(|(id, r)| {
                // Not mounted, and no earlier mount still alive: then
                // the engine's fsck neither fails nor waits holding the
                // image's lock.
                **r == Repair::Pending
                    && engine.mounted(**id).is_none()
                    && engine.wait_released(**id, Duration::ZERO).is_ok()
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ready {
            self.repairs.lock().insert(id, Repair::Running);
            let (e, repairs) = (engine.clone(), self.repairs.clone());
            let spawned = std::thread::Builder::new()
                .name("repair".into())
                .spawn(move || {
                    let name = match e.record(id) {
                        Ok(r) => e.full_name(&r),
                        Err(_) => {
                            repairs.lock().remove(&id);
                            return;
                        }
                    };
                    let res = Target::parse(&name).and_then(|t| e.fsck(&t));
                    let mut g = repairs.lock();
                    match res {
                        Ok((code, text)) => {
                            log::warn!(
                                "image {name}: repaired after ext4 errors: e2fsck -fy exit {code}: {}",
                                text.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("")
                            );
                            g.remove(&id);
                        }
                        Err(crate::error::Error::Busy(why)) => {
                            log::info!("image {name}: repair postponed ({why})");
                            g.insert(id, Repair::Pending);
                        }
                        Err(err) => {
                            log::error!("image {name}: repair (e2fsck -fy) failed: {err}");
                            g.remove(&id);
                        }
                    }
                });
            if let Err(err) = spawned {
                log::error!("cannot start a repair thread: {err}");
                self.repairs.lock().insert(id, Repair::Pending);
            }
        }
    }

    /// Warn once per level crossed; re-arm when usage falls back 5 points.
    fn warn(&mut self, p: &Plan, total: u64, available: u64) {
        let level = if p.state == PoolState::Full {
            100
        } else if p.used_percent >= 90.0 {
            90
        } else if p.used_percent >= 80.0 {
            80
        } else {
            0
        };
        if level > self.warned {
            self.warned = level;
            if level == 100 {
                log::warn!(
                    "pool full: {} of {} free, writers get ENOSPC until space is freed",
                    Bytes(available),
                    Bytes(total)
                );
            } else {
                log::warn!(
                    "pool {level} % used ({} of {} free)",
                    Bytes(available),
                    Bytes(total)
                );
            }
        } else if level < self.warned {
            let rearm = match self.warned {
                // Hysteresis: twice the threshold, so that it does not flap.
                100 => p.budget > 2 * FULL_BELOW,
                l => p.used_percent < l as f64 - 5.0,
            };
            if rearm {
                if self.warned == 100 {
                    log::info!("pool no longer full: {} free", Bytes(available));
                }
                self.warned = level;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_once_per_level_with_hysteresis() {
        let mut w = Watcher::default();
        let plan = |state, budget, used_percent| Plan {
            state,
            budget,
            used_percent,
            allowed: vec![],
        };
        w.warn(&plan(PoolState::Low, 1 << 30, 85.0), 1, 1);
        assert_eq!(w.warned, 80);
        w.warn(&plan(PoolState::Full, 1 << 20, 86.0), 1, 1);
        assert_eq!(w.warned, 100);
        // Just above the full threshold: no re-arm, no second warning.
        w.warn(&plan(PoolState::Low, FULL_BELOW + 1, 86.0), 1, 1);
        assert_eq!(w.warned, 100);
        w.warn(&plan(PoolState::Low, 4 * FULL_BELOW, 86.0), 1, 1);
        assert_eq!(w.warned, 80);
        w.warn(&plan(PoolState::Ok, 1 << 30, 70.0), 1, 1);
        assert_eq!(w.warned, 0);
    }
}
