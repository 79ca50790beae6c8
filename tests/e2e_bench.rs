//! `restfs bench` and `restfs stats` against a real mount: the benchmark
//! verifies what it reads back, and the client's counters account for it.

mod common;

use common::*;
use std::process::Command;

fn json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(RESTFS).args(args).output().unwrap();
    assert!(out.status.success(), "restfs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn bench_and_stats_report_what_the_client_did() {
    let root = scratch("e2e-bench");
    let server = Server::start(&root.join("data"));
    server.create_bucket("b");
    let mnt = root.join("mnt");
    let m = Mount::new(&server, "b", &mnt, &format!("cache_dir={}", root.join("cache").display()));

    let r = json(&["bench", mnt.to_str().unwrap(), "--big-mib", "8", "--small-files", "50", "--small-kib", "4", "--json"]);
    let names: Vec<&str> = r["results"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["big file write", "big file read", "small file write", "small file read", "stat"]);
    for o in r["results"].as_array().unwrap() {
        assert!(o["value"].as_f64().unwrap() > 0.0, "{o}");
    }
    let c = &r["client"]["counters"];
    // 8 MiB of fresh data plus 50 small files went up; nothing was deduplicated.
    assert!(c["bytes_uploaded"].as_u64().unwrap() >= (8 << 20) + 50 * 4096, "{c}");
    assert_eq!(c["bytes_written"].as_u64().unwrap(), (8 << 20) + 50 * 4096, "{c}");
    assert!(c["opens_from_cache"].as_u64().unwrap() >= 50, "{c}");
    assert!(r["client"]["ops"]["create"]["count"].as_u64().unwrap() >= 51, "{}", r["client"]);

    let s = json(&["stats", mnt.to_str().unwrap(), "--json"]);
    assert!(s["ops"]["write"]["count"].as_u64().unwrap() >= 58, "{s}");
    assert_eq!(s["uploads_in_flight"].as_i64().unwrap(), 0);
    // Off a RestFS mount: a clear refusal.
    let out = Command::new(RESTFS).args(["stats", root.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not on a RestFS mount"), "{}", String::from_utf8_lossy(&out.stderr));
    m.unmount();
}
