//! Cost of writing protected ports into real kernel maps: 100,000 ports
//! spread over 100 pods of 1,000 ports each, since a pod's ports map stores
//! at most `MAX_PORTS` (1,024) entries.
//!
//! Each pod gets its own copy of the maps of the embedded eBPF object, pinned
//! in its own directory below a bpffs directory that the benchmark removes
//! at the end. The maps are declared pinned, so pods sharing one directory
//! would share one map. The program itself is not loaded. Each update is the same `bpf(BPF_MAP_UPDATE_ELEM)` call with the same
//! key and value types that the agent makes when it attaches a pod:
//!
//! - `ports_update/100000`: insert or overwrite every port of every pod;
//! - `ports_update/1000`: the same for one pod, the cost of one attach.
//!
//! Creating maps needs root (`CAP_BPF`). Without it the benchmark prints why
//! and measures nothing.
//!
//! Run: `cargo bench -p tokengate --bench maps`. Results are recorded in
//! `docs/benchmarks.md`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use aya::maps::{HashMap, MapData, MapInfo};
use aya::{Ebpf, EbpfLoader};
use criterion::{criterion_group, Criterion};
use tokengate_common::{MAP_PORTS, MAX_PORTS};

/// Pods whose maps the benchmark fills.
const PODS: usize = 100;

/// Protected ports per pod, below the map capacity of `MAX_PORTS`.
const PORTS_PER_POD: u16 = 1000;

/// First port of each pod's range; ports are `FIRST_PORT..FIRST_PORT + 1000`.
const FIRST_PORT: u16 = 8000;

/// Value the agent stores for a protected port; the program tests presence.
const PORT_PRESENT: u8 = 1;

/// The object that `build.rs` copied next to the agent's build, read at run
/// time so that a renamed object skips this benchmark instead of breaking
/// the build.
const OBJECT_PATH: &str = concat!(env!("OUT_DIR"), "/tokengate-ebpf.o");

/// Mount point of bpffs, where the benchmark mounts it when it is missing.
const BPFFS: &str = "/sys/fs/bpf";

/// Directory below [`BPFFS`] that contains one directory of pins per pod,
/// removed with everything in it on drop.
struct PinRoot(PathBuf);

impl PinRoot {
    fn create() -> Self {
        if !is_bpffs(Path::new(BPFFS)) {
            let status = Command::new("mount")
                .args(["-t", "bpf", "bpf", BPFFS])
                .status()
                .expect("mount(8) runs");
            assert!(
                status.success(),
                "mount -t bpf bpf {BPFFS} failed: {status}"
            );
        }
        let root = Path::new(BPFFS).join(format!("tokengate-bench-{}", std::process::id()));
        std::fs::create_dir_all(&root).expect("the bench pin directory is created");
        Self(root)
    }

    fn pod_dir(&self, pod: usize) -> PathBuf {
        let dir = self.0.join(format!("pod-{pod}"));
        std::fs::create_dir_all(&dir).expect("the pod pin directory is created");
        dir
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.0) {
            eprintln!("maps: failed to remove {}: {error}", self.0.display());
        }
    }
}

/// Returns whether `path` is the mount point of a bpf filesystem.
fn is_bpffs(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|line| {
            let mut fields = line.split_whitespace();
            let mount_point = fields.nth(1);
            let kind = fields.next();
            mount_point == path.to_str() && kind == Some("bpf")
        })
    })
}

/// Returns why the benchmark cannot run here, or `None` when it can.
fn skip_reason() -> Option<String> {
    if effective_uid() != Some(0) {
        return Some("creating BPF maps needs root (CAP_BPF); run it as root".to_owned());
    }
    if !std::path::Path::new(OBJECT_PATH).is_file() {
        return Some(format!(
            "eBPF object {OBJECT_PATH} not found; build it with `cargo xtask build`"
        ));
    }
    None
}

/// Returns the effective user id from `/proc/self/status`.
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Loads one copy of the object's maps per pod, each pinned in its own
/// directory of `pins`.
fn load_pods(object: &[u8], pins: &PinRoot) -> Vec<Ebpf> {
    (0..PODS)
        .map(|pod| {
            EbpfLoader::new()
                .map_pin_path(pins.pod_dir(pod))
                .load(object)
                .expect("the embedded eBPF object loads")
        })
        .collect()
}

fn ports_map(ebpf: &mut Ebpf) -> HashMap<&mut MapData, u16, u8> {
    let map = ebpf
        .map_mut(MAP_PORTS)
        .expect("the object has the ports map");
    HashMap::try_from(map).expect("the ports map is a hash of u16 to u8")
}

/// Inserts (or overwrites) every port of one pod.
fn update_pod(ebpf: &mut Ebpf) {
    let mut map = ports_map(ebpf);
    for port in FIRST_PORT..FIRST_PORT + PORTS_PER_POD {
        map.insert(port, PORT_PRESENT, 0)
            .expect("the update stays within the map capacity");
    }
}

fn bench_ports_update(c: &mut Criterion) {
    if let Some(reason) = skip_reason() {
        println!("maps: skipped: {reason}");
        return;
    }
    assert!(
        u32::from(PORTS_PER_POD) <= MAX_PORTS,
        "the pod map has room for the ports"
    );
    let object = std::fs::read(OBJECT_PATH).expect("the eBPF object is readable");
    let pins = PinRoot::create();
    let mut pods = load_pods(&object, &pins);
    for pod in &mut pods {
        update_pod(pod);
    }
    let stored = ports_map(&mut pods[0]).keys().count();
    assert_eq!(stored, usize::from(PORTS_PER_POD), "every port was stored");
    let mut map_ids: Vec<u32> = (0..PODS)
        .map(|pod| {
            let pin = pins.pod_dir(pod).join(MAP_PORTS);
            MapInfo::from_pin(&pin)
                .expect("the pinned ports map is readable")
                .id()
        })
        .collect();
    map_ids.sort_unstable();
    map_ids.dedup();
    assert_eq!(map_ids.len(), PODS, "each pod has its own ports map");

    let mut group = c.benchmark_group("ports_update");
    // One iteration makes 100,000 system calls (tens of milliseconds), so
    // ten samples bound the run to seconds.
    group.sample_size(10);
    group.bench_function((PODS * usize::from(PORTS_PER_POD)).to_string(), |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                let started = Instant::now();
                for pod in &mut pods {
                    update_pod(pod);
                }
                total += started.elapsed();
            }
            total
        });
    });
    group.bench_function(PORTS_PER_POD.to_string(), |b| {
        b.iter(|| update_pod(&mut pods[0]));
    });
    group.finish();
    drop(pods);
    drop(pins);
}

criterion_group!(benches, bench_ports_update);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
