//! The kernel's own LUO selftests, unmodified, against `luo daemon`: the
//! single-boot `liveupdate`, and the two-stage ones with `luo update
//! --simulate` in place of `do_kexec.sh`.
//!
//! Fetches `linux-source-7.*` from Debian sid at test time (cached under
//! `$LUO_TEST_CACHE`, default `/var/cache/luo-test`), builds the selftests
//! against `make headers_install`, and runs `liveupdate` under `luo run` in a
//! private mount namespace with its own /dev. `LUO_SELFTEST_RUNS` repeats it.

mod common;

use std::path::Path;
use std::process::Command;

fn scripts() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/scripts"))
}

/// Builds (or finds cached) selftests; returns their directory.
fn selftests() -> String {
    let fetch = Command::new(scripts().join("fetch-selftests.sh"))
        .output()
        .expect("run fetch-selftests.sh");
    assert!(
        fetch.status.success(),
        "fetching the selftests failed:\n{}",
        String::from_utf8_lossy(&fetch.stderr)
    );
    String::from_utf8(fetch.stdout).unwrap().trim().to_owned()
}

fn run_selftest(args: &[&str]) -> String {
    let bin = selftests();
    let out = Command::new(scripts().join("run-selftest.sh"))
        .args([common::LUO, &bin])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{stdout}");
    assert!(
        out.status.success(),
        "selftest failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn upstream_liveupdate_selftest_passes_15_of_15() {
    common::require_capable();
    let runs = std::env::var("LUO_SELFTEST_RUNS").unwrap_or_else(|_| "1".into());
    let stdout = run_selftest(&["single", &runs]);
    assert!(stdout.contains(&format!("{runs} of {runs} runs passed 15/15")));
}

fn two_stage(test: &str) {
    common::require_capable();
    let stdout = run_selftest(&["two-stage", test]);
    assert!(stdout.contains(&format!(
        "{test}: stage 1, simulated update, stage 2 passed"
    )));
}

#[test]
fn luo_kexec_simple_passes_across_a_simulated_update() {
    two_stage("luo_kexec_simple");
}

#[test]
fn luo_multi_session_passes_across_a_simulated_update() {
    two_stage("luo_multi_session");
}

#[test]
fn luo_stress_sessions_passes_across_a_simulated_update() {
    two_stage("luo_stress_sessions");
}

#[test]
fn luo_stress_files_passes_across_a_simulated_update() {
    two_stage("luo_stress_files");
}

fn two_stage_with_restart(
    test: &str,
    sessions: usize,
    signal: &str,
    new_binary: Option<&std::path::Path>,
) {
    common::require_capable();
    let mut args = vec!["two-stage", test, signal];
    let new = new_binary.map(|p| p.to_string_lossy().into_owned());
    if let Some(n) = &new {
        args.push(n);
    }
    let stdout = run_selftest(&args);
    assert!(stdout.contains(&format!("daemon restarted after SIG{signal}")));
    let expected = format!("epoch 0  sessions {sessions}");
    assert!(
        stdout.contains(&expected),
        "the restarted daemon lost sessions:\n{stdout}"
    );
    assert!(stdout.contains(&format!(
        "{test}: stage 1, simulated update, stage 2 passed"
    )));
}

#[test]
fn sessions_and_files_survive_a_daemon_stopped_with_sigterm() {
    two_stage_with_restart("luo_stress_files", 2, "TERM", None);
}

#[test]
fn sessions_and_files_survive_a_daemon_killed_with_sigkill() {
    two_stage_with_restart("luo_stress_files", 2, "KILL", None);
}

#[test]
fn sessions_and_files_survive_an_upgrade_to_another_binary() {
    // Another executable file standing for a rebuilt binary.
    let dir = std::env::temp_dir().join(format!("luo-upgrade-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let upgraded = dir.join("luo-upgraded");
    std::fs::copy(common::LUO, &upgraded).unwrap();
    two_stage_with_restart("luo_multi_session", 5, "TERM", Some(&upgraded));
    let _ = std::fs::remove_dir_all(&dir);
}
