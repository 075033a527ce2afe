//! `luo demo` end to end: guest RAM survives a simulated update, every page
//! checked; hugetlb too when huge pages are free.

mod common;

use std::process::Command;

#[test]
fn demo_verifies_guest_ram_across_a_simulated_update() {
    common::require_capable();
    let out = Command::new(common::LUO)
        .args([
            "demo",
            "--size-mib",
            "16",
            "--hugetlb-mib",
            "4",
            "--extra-sessions",
            "20",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all 4096 pages (16 MiB) match their stage-1 checksums"));
    assert!(stdout.contains("20 extra sessions retrieved, checked and finished"));
    assert!(stdout.contains("1 processes of the old epoch ended"));
    assert!(stdout.contains("all 1024 pages (4 MiB) match") || stdout.contains("hugetlb: skipped"));
    assert!(stdout.trim_end().ends_with("luo demo: verified"));
}
