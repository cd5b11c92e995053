//! Where a call goes: rendezvous hashing with bounded load.
//!
//! Every node ranks the members for a function the same way (a hash of
//! the function and the node's id, highest first), so repeated calls of
//! one function land on one node — where its image is warm and the keys it
//! pulled are in the local tier — and a member joining or leaving moves
//! only the functions it wins or held. A node is skipped while it is full
//! (running at its capacity) or above its bound: `factor` × the average
//! load, but never less than half its capacity — below that a node is not
//! busy enough for a cold start elsewhere to pay. So one hot function
//! spills to the next node in its order instead of queueing; when every
//! node is skipped, the least loaded takes the call.

use crate::Load;

/// A member as placement sees it.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    pub id: &'a str,
    pub load: Load,
}

/// How far above the average load a node may go before calls spill past
/// it. The usual choice for consistent hashing with bounded loads.
pub const DEFAULT_BOUND: f64 = 1.25;

/// The node for a call of `function`, or None when there are no nodes.
pub fn place<'a>(function: &str, nodes: &[Candidate<'a>], factor: f64) -> Option<&'a str> {
    if nodes.is_empty() {
        return None;
    }
    let total: u64 = nodes.iter().map(|n| u64::from(n.load.running)).sum();
    // The average after this call is placed, scaled: never below 1, so an
    // idle cluster still sends a call to its first-ranked node.
    let average_bound = (factor * (total + 1) as f64 / nodes.len() as f64).ceil().max(1.0) as u64;
    let mut ranked: Vec<(u64, &Candidate<'a>)> = nodes.iter().map(|n| (score(function, n.id), n)).collect();
    ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.id.cmp(b.1.id)));
    if let Some((_, chosen)) =
        ranked.iter().find(|(_, n)| n.load.has_room() && u64::from(n.load.running) < bound(n.load, average_bound))
    {
        return Some(chosen.id);
    }
    // Everyone is full or over the bound: the least loaded, by the share
    // of its capacity in use (ties to the better ranked).
    ranked.iter().min_by(|a, b| utilisation(a.1.load).total_cmp(&utilisation(b.1.load))).map(|(_, n)| n.id)
}

/// The most calls a node takes before calls spill past it.
fn bound(load: Load, average_bound: u64) -> u64 {
    average_bound.max(u64::from(load.capacity).div_ceil(2))
}

/// The rank of `node` for `function`: the same on every node and every
/// run (a fixed hash, not the process's random one).
pub fn score(function: &str, node: &str) -> u64 {
    // FNV-1a over both strings (separated), then a 64-bit finaliser so
    // that nearby inputs spread over the whole range.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in node.bytes().chain([0xff]).chain(function.bytes()) {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn utilisation(load: Load) -> f64 {
    if load.capacity == 0 {
        // A node that runs no calls (a gateway, or one still starting).
        return f64::INFINITY;
    }
    f64::from(load.running) / f64::from(load.capacity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nodes(ids: &[String], loads: &[(u32, u32)]) -> Vec<Candidate<'static>> {
        ids.iter()
            .zip(loads)
            .map(|(id, &(running, capacity))| Candidate {
                id: Box::leak(id.clone().into_boxed_str()),
                load: Load { running, capacity },
            })
            .collect()
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i:02}")).collect()
    }

    proptest! {
        /// Idle nodes: every node picks the same one for a function
        /// whatever order it lists the members in, and a node joining
        /// takes a function over or leaves it where it was.
        #[test]
        fn idle_placement_is_stable_and_a_join_moves_only_to_the_new_node(
            n in 1usize..12, function in "[a-z]{1,8}/[a-z]{1,8}", rotate in 0usize..12,
        ) {
            let ids = ids(n + 1);
            let idle = vec![(0, 8); n + 1];
            let before = nodes(&ids[..n], &idle);
            let chosen = place(&function, &before, DEFAULT_BOUND).unwrap();
            let mut rotated = before.clone();
            rotated.rotate_left(rotate % n);
            prop_assert_eq!(place(&function, &rotated, DEFAULT_BOUND), Some(chosen));
            let after = nodes(&ids, &idle);
            let now = place(&function, &after, DEFAULT_BOUND).unwrap();
            prop_assert!(now == chosen || now == ids[n], "{} moved from {} to {}", function, chosen, now);
        }

        /// Under any loads: a node with room is chosen whenever one has
        /// room, and a node ranked above the chosen one was full or over
        /// the bound.
        #[test]
        fn the_choice_has_room_when_any_node_has_and_spills_only_past_busy_nodes(
            loads in proptest::collection::vec((0u32..20, 1u32..16), 1..10),
            function in "[a-z]{1,8}",
        ) {
            let ids = ids(loads.len());
            let candidates = nodes(&ids, &loads);
            let chosen = place(&function, &candidates, DEFAULT_BOUND).unwrap();
            let load_of = |id: &str| candidates.iter().find(|c| c.id == id).unwrap().load;
            if candidates.iter().any(|c| c.load.has_room()) {
                prop_assert!(load_of(chosen).has_room(), "{} is full: {:?}", chosen, candidates);
            }
            let total: u64 = loads.iter().map(|&(r, _)| u64::from(r)).sum();
            let average = (DEFAULT_BOUND * (total + 1) as f64 / loads.len() as f64).ceil().max(1.0) as u64;
            let chosen_score = score(&function, chosen);
            for c in &candidates {
                let bound = average.max(u64::from(c.load.capacity).div_ceil(2));
                if score(&function, c.id) > chosen_score {
                    prop_assert!(
                        !c.load.has_room() || u64::from(c.load.running) >= bound,
                        "{} ranks above {} and was free", c.id, chosen
                    );
                }
            }
        }
    }

    #[test]
    fn a_hot_function_spreads_over_the_nodes_once_its_first_node_is_busy() {
        let ids = ids(3);
        let mut loads = vec![(0u32, 8u32); 3];
        let mut placed = std::collections::HashMap::new();
        // 30 concurrent calls of one function, none finishing: 8 fit on
        // each node; past 24 every node is full and they even out.
        for _ in 0..30 {
            let candidates = nodes(&ids, &loads);
            let chosen = place("acme/hot", &candidates, DEFAULT_BOUND).unwrap();
            *placed.entry(chosen).or_insert(0) += 1;
            let i = ids.iter().position(|id| id == chosen).unwrap();
            loads[i].0 += 1;
        }
        assert_eq!(placed.len(), 3, "{placed:?}");
        assert!(placed.values().all(|&n| n == 10), "evened out when all are full: {placed:?}");
        assert_eq!(place("acme/hot", &[], DEFAULT_BOUND), None);
    }

    #[test]
    fn sequential_calls_of_one_function_stay_on_one_node_while_it_has_room() {
        let ids = ids(3);
        let first = place("acme/f", &nodes(&ids, &[(0, 8); 3]), DEFAULT_BOUND).unwrap();
        let i = ids.iter().position(|id| id == first).unwrap();
        // The node running a call or three of its own still takes the next.
        for running in 1..4 {
            let mut loads = vec![(0u32, 8u32); 3];
            loads[i].0 = running;
            assert_eq!(place("acme/f", &nodes(&ids, &loads), DEFAULT_BOUND), Some(first), "at {running} running");
        }
    }

    #[test]
    fn a_node_with_no_capacity_gets_calls_only_when_it_is_the_only_node() {
        let ids = ids(3);
        for function in ["a/x", "a/y", "a/z", "b/w"] {
            // Everyone else full: still not the node that runs nothing.
            let chosen = place(function, &nodes(&ids, &[(0, 0), (8, 8), (9, 8)]), DEFAULT_BOUND);
            assert_eq!(chosen, Some(ids[1].as_str()), "{function}");
        }
        assert_eq!(place("a/x", &nodes(&ids[..1], &[(0, 0)]), DEFAULT_BOUND), Some(ids[0].as_str()));
    }

    #[test]
    fn different_functions_prefer_different_nodes() {
        let ids = ids(4);
        let idle = nodes(&ids, &[(0, 8); 4]);
        let firsts: std::collections::HashSet<&str> =
            (0..64).map(|i| place(&format!("t/f{i}"), &idle, DEFAULT_BOUND).unwrap()).collect();
        assert_eq!(firsts.len(), 4, "64 functions all land on {firsts:?}");
    }
}
