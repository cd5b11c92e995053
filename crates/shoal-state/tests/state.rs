//! The state tiers against a plain in-memory model (proptest): whatever
//! sequence of operations runs, the embedded global tier answers as a map
//! of byte vectors would, and a local tier pushed through dirty chunks ends
//! up equal to the global copy.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use shoal_state::{EmbeddedGlobal, EmbeddedStore, LocalTier, ScopedKey, StateError, StateLimits};

#[derive(Clone, Debug)]
enum Op {
    Set(usize, u8, usize),
    Append(usize, u8, usize),
    Delete(usize),
    Incr(usize, i64),
    GetRange(usize, u64, u64),
}

const KEYS: [&str; 3] = ["a", "../b", "c\0d"];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..KEYS.len(), any::<u8>(), 0usize..150_000).prop_map(|(k, b, n)| Op::Set(k, b, n)),
        (0..KEYS.len(), any::<u8>(), 0usize..70_000).prop_map(|(k, b, n)| Op::Append(k, b, n)),
        (0..KEYS.len()).prop_map(Op::Delete),
        (0..KEYS.len(), -1000i64..1000).prop_map(|(k, d)| Op::Incr(k, d)),
        (0..KEYS.len(), 0u64..200_000, 0u64..100_000).prop_map(|(k, o, l)| Op::GetRange(k, o, l)),
    ]
}

fn global(dir: &tempfile::TempDir, limits: StateLimits) -> EmbeddedGlobal {
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
    EmbeddedGlobal::new(store, limits)
}

fn key(i: usize) -> ScopedKey {
    ScopedKey::new("t", KEYS[i]).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn the_embedded_global_tier_behaves_like_a_map(ops in proptest::collection::vec(op(), 1..16)) {
        let dir = tempfile::tempdir().unwrap();
        let tier = global(&dir, StateLimits::default());
        let mut model: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Set(k, b, n) => {
                    tier.set(&key(k), &vec![b; n]).unwrap();
                    model.insert(k, vec![b; n]);
                }
                Op::Append(k, b, n) => {
                    let len = tier.append(&key(k), &vec![b; n]).unwrap();
                    let value = model.entry(k).or_default();
                    value.extend(std::iter::repeat_n(b, n));
                    prop_assert_eq!(len, value.len() as u64);
                }
                Op::Delete(k) => {
                    prop_assert_eq!(tier.delete(&key(k)).unwrap(), model.remove(&k).is_some());
                }
                Op::Incr(k, d) => {
                    let expected = match model.get(&k) {
                        None => Some(0),
                        Some(v) => std::str::from_utf8(v).ok().and_then(|t| t.parse::<i64>().ok()),
                    };
                    match (tier.incr(&key(k), d), expected) {
                        (Ok(got), Some(before)) => {
                            prop_assert_eq!(got, before + d);
                            model.insert(k, (before + d).to_string().into_bytes());
                        }
                        (Err(StateError::NotAnInteger(_)), None) => {}
                        (got, expected) => prop_assert!(false, "incr: got {:?}, model {:?}", got, expected),
                    }
                }
                Op::GetRange(k, o, l) => {
                    let expected = model.get(&k).map(|v| {
                        let start = (o as usize).min(v.len());
                        let end = (start + l as usize).min(v.len());
                        v[start..end].to_vec()
                    });
                    prop_assert_eq!(tier.get_range(&key(k), o, l).unwrap(), expected);
                }
            }
        }
        for k in 0..KEYS.len() {
            prop_assert_eq!(tier.get(&key(k)).unwrap(), model.get(&k).cloned());
        }
        let total: usize = model.values().map(Vec::len).sum();
        prop_assert_eq!(tier.usage("t").unwrap(), total as u64, "usage equals the sum of lengths");
    }

    #[test]
    fn pushing_dirty_chunks_makes_the_global_copy_equal(
        writes in proptest::collection::vec((0u64..200_000, any::<u8>(), 1usize..70_000), 1..12),
        push_every in 1usize..4,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let tier = global(&dir, StateLimits::default());
        let local = LocalTier::new();
        let k = key(0);
        let mut model: Vec<u8> = Vec::new();
        for (i, (offset, b, n)) in writes.into_iter().enumerate() {
            local.set_range(&k, offset, &vec![b; n]).unwrap();
            let end = offset as usize + n;
            if model.len() < end {
                model.resize(end, 0);
            }
            model[offset as usize..end].fill(b);
            if i % push_every == 0 {
                let dirty = local.dirty_chunks(&k).unwrap();
                tier.write_chunks(&k, &dirty).unwrap();
                local.mark_clean(&k, &dirty);
                prop_assert_eq!(tier.get(&k).unwrap().unwrap(), model.clone());
            }
        }
        let dirty = local.dirty_chunks(&k).unwrap();
        tier.write_chunks(&k, &dirty).unwrap();
        prop_assert_eq!(tier.get(&k).unwrap().unwrap(), model.clone());
        prop_assert_eq!(local.get(&k).unwrap(), model);
    }
}

#[test]
fn refused_writes_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let tier = global(&dir, StateLimits { max_value_bytes: 1000, tenant_quota_bytes: 1500 });
    let a = ScopedKey::new("t", "a").unwrap();
    let b = ScopedKey::new("t", "b").unwrap();
    tier.set(&a, &[1; 1000]).unwrap();
    assert!(matches!(tier.set(&a, &[2; 1001]), Err(StateError::TooLarge(_))));
    assert_eq!(tier.get(&a).unwrap().unwrap(), vec![1; 1000], "no partial write");
    assert!(matches!(tier.set(&b, &[3; 600]), Err(StateError::LimitExceeded(_))));
    assert!(matches!(tier.append(&a, &[4]), Err(StateError::TooLarge(_))));
    assert_eq!(tier.get(&b).unwrap(), None);
    assert_eq!(tier.usage("t").unwrap(), 1000);
    // Shrinking is always allowed, and frees quota.
    tier.set(&a, &[5; 10]).unwrap();
    tier.set(&b, &[6; 600]).unwrap();
    assert_eq!(tier.usage("t").unwrap(), 610);
}

#[test]
fn tenants_never_see_each_others_keys() {
    let dir = tempfile::tempdir().unwrap();
    let tier = global(&dir, StateLimits::default());
    tier.set(&ScopedKey::new("acme", "x").unwrap(), b"acme's").unwrap();
    for probe in ["../acme/x", "acme/x", "/acme/x", "x\0", "..\\acme\\x"] {
        let key = ScopedKey::new("other", probe).unwrap();
        assert_eq!(tier.get(&key).unwrap(), None, "{probe:?}");
    }
    assert_eq!(tier.list("other").unwrap(), Vec::<(String, u64)>::new());
    assert_eq!(tier.list("acme").unwrap(), vec![("x".to_string(), 6)]);
    tier.set(&ScopedKey::new("other", "x").unwrap(), b"mine").unwrap();
    assert_eq!(tier.get(&ScopedKey::new("acme", "x").unwrap()).unwrap().unwrap(), b"acme's");
}

#[test]
fn acknowledged_writes_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let k = ScopedKey::new("t", "counter").unwrap();
    {
        let tier = global(&dir, StateLimits::default());
        tier.incr(&k, 41).unwrap();
        tier.incr(&k, 1).unwrap();
        tier.append(&ScopedKey::new("t", "log").unwrap(), b"one,").unwrap();
    }
    let tier = global(&dir, StateLimits::default());
    assert_eq!(tier.get(&k).unwrap().unwrap(), b"42");
    assert_eq!(tier.incr(&k, 0).unwrap(), 42);
    assert_eq!(tier.get(&ScopedKey::new("t", "log").unwrap()).unwrap().unwrap(), b"one,");
}
