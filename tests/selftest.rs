//! The kernel's own `liveupdate` selftest, unmodified, against `luo daemon`.
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

#[test]
fn upstream_liveupdate_selftest_passes_15_of_15() {
    skip_unless_capable!();
    let fetch = Command::new(scripts().join("fetch-selftests.sh"))
        .output()
        .expect("run fetch-selftests.sh");
    assert!(
        fetch.status.success(),
        "fetching the selftests failed:\n{}",
        String::from_utf8_lossy(&fetch.stderr)
    );
    let bin = String::from_utf8(fetch.stdout).unwrap().trim().to_owned();
    let runs = std::env::var("LUO_SELFTEST_RUNS").unwrap_or_else(|_| "1".into());
    let out = Command::new(scripts().join("run-selftest.sh"))
        .args([common::LUO, &bin, &runs])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "selftest failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("{runs} of {runs} runs passed 15/15")));
}
