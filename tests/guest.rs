//! The guest rig (`tests/vm/`): a Linux 7.2 kernel built from Debian sid's
//! `linux-source-7.*` with CUSE, KHO and the in-kernel LUO, booted under QEMU
//! (TCG) with one scenario per boot. The same selftests run against the
//! in-kernel module (the baseline, across a real kexec) and against the
//! daemon serving a real character device through `/dev/cuse`. One boot
//! drives a real PCI device (QEMU's edu) through VFIO and iommufd behind an
//! emulated IOMMU.
//!
//! The kernel build (about 5 minutes on 2 cores) is cached under
//! `$LUO_TEST_CACHE/vm`, keyed by source version and config fragment.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// One guest at a time: each takes both cores under TCG.
static ONE_GUEST: Mutex<()> = Mutex::new(());

/// How long a boot may take before it counts as hung.
const BOOT_TIMEOUT_S: u32 = 600;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn script_output(script: &str, args: &[&str]) -> String {
    let out = Command::new(root().join(script))
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(out.status.success(), "{script} failed");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A line the user sees as the tests run: written to stderr itself, which
/// the test harness does not capture (it captures `eprintln!`).
fn progress(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// The opt-out: `LUO_SKIP_GUEST=1` skips the guest rig (and `tests/run`
/// says so in its summary).
fn opted_out() -> bool {
    std::env::var_os("LUO_SKIP_GUEST").is_some_and(|v| v != "0")
}

/// What this machine lacks to boot guests, with the command that fixes it.
fn missing() -> Option<String> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (the kernel sources are cached under /var/cache)".into());
    }
    let have = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    for tool in [
        "qemu-system-x86_64",
        "busybox",
        "kexec",
        "cpio",
        "bison",
        "flex",
    ] {
        if !have(tool) {
            return Some(format!(
                "needs {tool}: run `tests/run`, which installs what the tests need"
            ));
        }
    }
    None
}

/// The release build of `luo` (a debug build is too slow under TCG).
fn release_luo() -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--bin", "luo"])
        .current_dir(root())
        .status()
        .unwrap();
    assert!(status.success(), "cargo build --release failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    target.join("release/luo")
}

/// Boots `scenario` with `args` on the kernel command line and returns the
/// guest's console (None if this machine cannot); panics with the console if
/// the scenario does not pass.
fn boot(scenario: &str, args: &[&str]) -> Option<String> {
    boot_with(scenario, "3G", BOOT_TIMEOUT_S, args)
}

/// QEMU's machine for device handover: q35 with an intel-iommu that remaps
/// interrupts (the kernel then lets VFIO and iommufd attach devices), and
/// two edu DMA devices.
const IOMMU_MACHINE: &str =
    "-machine q35,kernel-irqchip=split -device intel-iommu,intremap=on -device edu -device edu";

/// [`boot`] in a guest of `mem` memory (QEMU's `-m`), killed after
/// `timeout_s` seconds.
fn boot_with(scenario: &str, mem: &str, timeout_s: u32, args: &[&str]) -> Option<String> {
    if opted_out() {
        progress(&format!(
            "SKIPPED guest scenario {scenario}: LUO_SKIP_GUEST is set"
        ));
        return None;
    }
    if let Some(reason) = missing() {
        panic!("cannot boot guest scenario {scenario}: {reason}");
    }
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    progress(&format!(
        "guest scenario {scenario}: preparing the kernel (built once, about 5 minutes on 2 cores), initramfs and kmod-shim"
    ));
    let kernel = script_output("tests/vm/build-kernel.sh", &[]);
    let selftests = script_output("tests/scripts/fetch-selftests.sh", &[]);
    let luo = release_luo();
    // The kernel build directory, for the out-of-tree kmod-shim.
    let kbuild = Path::new(&kernel).ancestors().nth(4).unwrap().to_owned();
    let shim_dir = std::env::temp_dir().join(format!("luo-rig-shim-{}", std::process::id()));
    let shim = script_output(
        "kmod-shim/build.sh",
        &[kbuild.to_str().unwrap(), shim_dir.to_str().unwrap()],
    );
    let dir = std::env::temp_dir().join(format!("luo-rig-{}-{scenario}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let initramfs = dir.join("initramfs.gz");
    // systemd's test-luo from sid, for the scenario that runs it.
    let systemd = if scenario == "systemd" {
        script_output("tests/scripts/fetch-systemd.sh", &[])
    } else {
        String::new()
    };
    script_output(
        "tests/vm/make-initramfs.sh",
        &[
            initramfs.to_str().unwrap(),
            &kernel,
            luo.to_str().unwrap(),
            &selftests,
            &shim,
            &systemd,
        ],
    );
    let _ = std::fs::remove_dir_all(&shim_dir);
    let timeout = timeout_s.to_string();
    let mut argv = vec![
        kernel.as_str(),
        initramfs.to_str().unwrap(),
        scenario,
        timeout.as_str(),
    ];
    argv.extend_from_slice(args);
    let machine = if scenario.starts_with("vfio") {
        IOMMU_MACHINE
    } else {
        ""
    };
    progress(&format!(
        "guest scenario {scenario}: booting under QEMU (TCG, up to {timeout_s} s)"
    ));
    let started = std::time::Instant::now();
    let out = Command::new(root().join("tests/vm/boot.sh"))
        .args(&argv)
        .env("RIG_MEM", mem)
        .env("RIG_QEMU_ARGS", machine)
        .output()
        .unwrap();
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "guest scenario {scenario} failed:\n{console}"
    );
    progress(&format!(
        "guest scenario {scenario}: passed in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    for line in console.lines().filter(|l| l.starts_with("RIG")) {
        eprintln!("{line}");
    }
    Some(console)
}

/// The oracle lines of one label: (phase, step) → the rest of the line.
fn oracle_lines(console: &str, label: &str) -> Vec<(String, serde_json::Value)> {
    let prefix = format!("ORACLE {label} ");
    console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix(&prefix))
        .map(|json| {
            let v: serde_json::Value = serde_json::from_str(json).expect("an oracle line is JSON");
            (
                format!("{}/{}", v["phase"], v["step"].as_str().unwrap_or("?")),
                v,
            )
        })
        .collect()
}

/// Steps where the userspace device differs from the kernel on purpose; each
/// is explained in the README ("Differences from the in-kernel module").
const DELIBERATE: &[&str] = &[
    // /proc names the kernel's session fds `anon_inode:[luo_session]`; ours
    // are files of the daemon's FUSE mount.
    "1/session-fd-link",
    // Not here: a preserved memfd's frozen size (`truncate-preserved`,
    // `grow-preserved-by-write`). The scenario loads kmod-shim, whose
    // LUO_SHIM_FREEZE fixes the size as the kernel does; without the module
    // the update refuses a memfd whose size moved instead (host tests).
];

#[test]
fn the_cuse_device_answers_the_corpus_as_the_kernel_does() {
    let Some(console) = boot("oracle", &["liveupdate=on", "kho=on"]) else {
        return;
    };
    let kernel = oracle_lines(&console, "kernel");
    let ours = oracle_lines(&console, "cuse");
    assert!(
        kernel.len() > 80,
        "the kernel run is incomplete:\n{console}"
    );
    let mut differences = Vec::new();
    for (i, (step, k)) in kernel.iter().enumerate() {
        let o = ours.iter().find(|(s, _)| s == step).map(|(_, v)| v);
        if DELIBERATE.contains(&step.as_str()) {
            eprintln!(
                "documented difference {step}:\n    kernel: {k}\n    ours:   {}",
                o.map_or("(missing)".into(), |v| v.to_string())
            );
        } else if o != Some(k) {
            differences.push(format!(
                "{i:3} {step}\n    kernel: {k}\n    ours:   {}",
                o.map_or("(missing)".into(), |v| v.to_string())
            ));
        }
    }
    if ours.len() != kernel.len() {
        differences.push(format!(
            "{} kernel steps, {} of ours",
            kernel.len(),
            ours.len()
        ));
    }
    assert!(
        differences.is_empty(),
        "{} undocumented differences:\n{}",
        differences.len(),
        differences.join("\n")
    );
    eprintln!(
        "oracle: {} steps, identical but for {} documented differences",
        kernel.len(),
        DELIBERATE.len()
    );
}

/// The bench scenario on a tiny plan: every row measured on all three
/// devices, and kmod-shim's stash and restore across the kexec (the figures
/// in BENCHMARKS.md come from `tests/vm/bench.sh`).
#[test]
fn the_bench_measures_the_kernel_cuse_and_fuse_file_devices() {
    let plan = [
        "liveupdate=on",
        "kho=on",
        "rig.calls=20",
        "rig.sizes=4,1024",
        "rig.sessions=10",
        "rig.files=10",
    ];
    let Some(mut console) = boot("bench", &plan) else {
        return;
    };
    let shim = [&plan[2..], &["liveupdate=off", "kho=on", "rig.part=shim"]].concat();
    console.push_str(&boot("bench", &shim).unwrap_or_default());
    let runs = luo_cuse_dev::tools::bench::read_log(&console).expect("BENCH lines parse");
    let labels: Vec<&str> = runs.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(
        labels,
        ["kernel", "cuse", "fuse-file", "kmod-shim"],
        "{console}"
    );
    let table = luo_cuse_dev::tools::bench::side_by_side(&runs);
    for (label, rows) in &runs[..3] {
        assert_eq!(rows.len(), 14, "{label}: {} rows\n{table}", rows.len());
    }
    // kmod-shim: stash and restore of each size, across a kexec, in place
    // and (a twin) by copying.
    let shim: Vec<&str> = runs[3].1.iter().map(|r| r.op.as_str()).collect();
    assert_eq!(
        shim,
        [
            "PRESERVE_FD 4 KiB",
            "PRESERVE_FD 1 MiB",
            "RETRIEVE_FD 4 KiB",
            "RETRIEVE_FD 4 KiB copy",
            "RETRIEVE_FD 1 MiB",
            "RETRIEVE_FD 1 MiB copy"
        ],
        "{table}"
    );
}

/// kmod-shim (in-kernel LUO off, `kho=on`): a 256 MiB shmem and a 64 MiB
/// hugetlb memfd written with a pattern come back across a real kexec,
/// identical, with size, position and seals; bad input gets the module's
/// errno; the module cannot be unloaded while it holds stashes.
#[test]
fn a_vfio_device_does_dma_through_iommufd_and_is_handed_over_by_an_update() {
    let Some(console) = boot("vfio", &["intel_iommu=on", "iommu=nopt"]) else {
        return;
    };
    for line in ["went to the device and back through IOVA", "read nothing"] {
        assert!(console.contains(line), "no '{line}':\n{console}");
    }
}

/// The same handover across a real `luo kexec` (kmod-shim, in-kernel LUO
/// off): the device is reset by the kexec, bound to vfio-pci again by the
/// next kernel's daemon with its iommufd made anew and guest RAM mapped at
/// the same IOVAs, and DMAs for the next VMM with no setup; a device removed
/// before that daemon starts fails only its own retrieve.
#[test]
fn a_vfio_device_is_made_again_after_a_real_kexec_and_dmas_with_no_setup() {
    let Some(console) = boot(
        "vfio-kexec",
        &["intel_iommu=on", "iommu=nopt", "kho=on", "liveupdate=off"],
    ) else {
        return;
    };
    for line in [
        "preserving a device whose iommufd maps process memory is refused",
        "1 VFIO devices bound again, 1 iommufds with 256 MiB mapped made anew",
        "guest RAM holds what the device wrote before the kexec",
        "made again by LUO, DMAs 4095 bytes through the same IOVAs with no setup",
        "a device gone after the kexec fails only its own retrieve (ENODEV, twice)",
    ] {
        assert!(console.contains(line), "no '{line}':\n{console}");
    }
}

/// systemd 262's own LUO client, `test-luo` from Debian sid, unmodified,
/// across a real `luo kexec` (kmod-shim): `store`/`check` (two memfds in the
/// fd store, and a session of its own whose fd it checks is a LUO session)
/// and `store-hijack`/`check-hijack` (a session named like systemd's is not
/// carried), with `luo fdstore` as PID 1's fd store and systemd-shutdown.
#[test]
fn systemd_test_luo_passes_unmodified_across_a_real_kexec() {
    let Some(console) = boot("systemd", &["kho=on", "liveupdate=off"]) else {
        return;
    };
    for line in [
        "Verified fd 'testfd1': content matches.",
        "Verified fd 'testfd2': content matches.",
        "All fd store checks passed.",
        "Verified LUO session memfd content matches.",
        "hijack fd correctly not restored",
    ] {
        assert!(console.contains(line), "no '{line}':\n{console}");
    }
}

#[test]
fn kmod_shim_carries_shmem_and_hugetlb_memfds_across_a_real_kexec() {
    let Some(console) = boot("shim", &["kho=on", "liveupdate=off"]) else {
        return;
    };
    for token in [
        "token 1 (shmem): 256 MiB identical",
        "token 2 (hugetlb): 64 MiB identical",
        "token 3 (hugetlb, mapped through the module): 4 MiB identical",
    ] {
        assert!(console.contains(token), "no '{token}':\n{console}");
    }
}

/// `luo kexec` with kmod-shim (in-kernel LUO off, `kho=on`): the four
/// two-stage selftests and a VMM's 256 MiB shmem and 64 MiB hugetlb guest RAM
/// survive a real kexec; before it, a bad kernel image and a freeze that fails
/// are refused with every session and page left in place.
#[test]
fn luo_kexec_carries_the_sessions_across_a_real_kexec() {
    let Some(console) = boot("kexec", &["kho=on", "liveupdate=off"]) else {
        return;
    };
    for line in [
        "all 65536 pages (256 MiB) match",
        "all 16384 pages (64 MiB) match",
        "bad image: luo: kexec aborted, nothing changed",
        "refused freeze: luo: kexec aborted, nothing changed",
        "stashed 512 of 512 files",
        "a daemon killed (SIGKILL) while rebuilding the sessions",
    ] {
        assert!(console.contains(line), "no '{line}':\n{console}");
    }
}

/// A folio kmod-shim cannot pin (it must migrate out of `ZONE_MOVABLE`, and
/// a pipe holds a reference on it) fails its stash: `luo kexec` is refused
/// with the module's errno, nothing stays stashed, every session stays, and
/// guest RAM pinned before the failure comes back whole.
#[test]
fn a_stash_that_cannot_pin_is_refused_with_everything_in_place() {
    let args = ["kho=on", "liveupdate=off", "movablecore=1G"];
    let Some(console) = boot("pin", &args) else {
        return;
    };
    for line in [
        "cannot be stashed: ENOMEM",
        "all 16384 pages (64 MiB) match",
        "RIG: pin: refused with",
    ] {
        assert!(console.contains(line), "no '{line}':\n{console}");
    }
}

/// The in-kernel LUO and kmod-shim each carry a 256 MiB memfd across the
/// same kexec: KHO serves both.
#[test]
fn in_kernel_luo_and_kmod_shim_share_one_kexec() {
    let Some(console) = boot("mix", &["kho=on", "liveupdate=on"]) else {
        return;
    };
    assert!(
        console.contains("token 1 (shmem): 256 MiB identical"),
        "{console}"
    );
}

/// Where an earlier kmod-shim lost folios: a 6 GiB guest with 2 GiB of KHO
/// scratch, the in-kernel LUO and kmod-shim each carrying 1 GiB across one
/// kexec, filled under memory pressure so that folios land in scratch. Every
/// word of both memfds comes back; no folio is preserved in scratch (the
/// kernel's KHO debug checks would refuse it) and the kernel never warns.
#[test]
fn kmod_shim_keeps_folios_out_of_kho_scratch_under_pressure() {
    let args = ["kho=on", "liveupdate=on", "kho_scratch=64M,2G,0"];
    let Some(console) = boot_with("scratch", "6G", BOOT_TIMEOUT_S, &args) else {
        return;
    };
    assert!(
        console.contains("token 1 (shmem): 1024 MiB identical"),
        "{console}"
    );
    assert!(
        console.contains("RIG: scratch: both came back whole"),
        "{console}"
    );
}

#[test]
fn in_kernel_luo_passes_the_selftests_across_a_real_kexec() {
    boot("kernel", &["liveupdate=on", "kho=on"]);
}

#[test]
fn the_cuse_device_passes_the_selftests() {
    // LUO_RIG_REPEAT=N runs the liveupdate selftest N times in the one boot
    // (a minute more for each run).
    let repeat: u32 = std::env::var("LUO_RIG_REPEAT")
        .ok()
        .map(|v| v.parse().expect("LUO_RIG_REPEAT is a number of runs"))
        .unwrap_or(1);
    let arg = format!("rig.repeat={repeat}");
    let timeout = BOOT_TIMEOUT_S + 60 * repeat;
    boot_with("cuse", "3G", timeout, &["liveupdate=off", &arg]);
}
