//! The policy's cost per call, and that it does not grow with the number
//! of tenants the node has seen: a call admitted and finished (the fast
//! path), and one queued, named by `next` and finished, beside 1 and
//! 10,000 idle tenants known to the policy.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use shoal_sched::{Admission, Decision, Origin, Policy, PolicyConfig};

const MS: Duration = Duration::from_millis(1);

/// A two-core policy that has seen `tenants` tenants, each of which ran a
/// call once.
fn seen(tenants: usize) -> Policy {
    let mut p = Policy::new(PolicyConfig::new(2));
    let now = Instant::now();
    for i in 0..tenants {
        let name = format!("idle-{i}");
        assert_eq!(p.admit(now, &name, i as u64, MS, now + 100 * MS, Origin::Root), Admission::Run);
        p.finish(&name, MS, MS, Origin::Root);
    }
    p
}

fn policy(c: &mut Criterion) {
    let mut group = c.benchmark_group("policy");
    for tenants in [1, 10_000] {
        let mut p = seen(tenants);
        let mut ticket = 1_000_000u64;
        group.bench_with_input(BenchmarkId::new("admit_finish", tenants), &tenants, |b, _| {
            b.iter(|| {
                let now = Instant::now();
                ticket += 1;
                assert_eq!(
                    p.admit(now, "busy", ticket, MS, now + Duration::from_secs(1), Origin::Root),
                    Admission::Run
                );
                assert!(p.next(now).is_empty());
                p.finish("busy", MS, MS, Origin::Root);
                assert!(p.next(now).is_empty());
            })
        });
        // Both short places taken by calls of another tenant: each call
        // of `busy` queues, and is named when one of them ends.
        let mut p = seen(tenants);
        let now = Instant::now();
        let far = now + Duration::from_secs(3600);
        for t in 0..2 {
            assert_eq!(p.admit(now, "holder", t, MS, far, Origin::Root), Admission::Run);
        }
        group.bench_with_input(BenchmarkId::new("queue_next_finish", tenants), &tenants, |b, _| {
            b.iter(|| {
                let now = Instant::now();
                ticket += 1;
                assert_eq!(p.admit(now, "busy", ticket, MS, far, Origin::Root), Admission::Queued);
                p.finish("holder", MS, MS, Origin::Root);
                assert_eq!(p.next(now), vec![Decision::Run(ticket)]);
                p.finish("busy", MS, MS, Origin::Root);
                assert_eq!(p.admit(now, "holder", 0, MS, far, Origin::Root), Admission::Run);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, policy);
criterion_main!(benches);
