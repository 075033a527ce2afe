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
    skip_unless_capable!();
    let runs = std::env::var("LUO_SELFTEST_RUNS").unwrap_or_else(|_| "1".into());
    let stdout = run_selftest(&["single", &runs]);
    assert!(stdout.contains(&format!("{runs} of {runs} runs passed 15/15")));
}

fn two_stage(test: &str) {
    skip_unless_capable!();
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
