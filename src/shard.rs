//! Which replica watches which target, when a fleet is split over several (`--shard N/M`).
//!
//! A target belongs to shard `hashmod(name, M)`, computed as Prometheus' `hashmod` relabel
//! action does: the MD5 digest of the name, its last 8 bytes read as a big-endian integer, modulo
//! the number of shards. MD5 is not used for security here, only because its output is fixed by
//! its specification, so an assignment never changes between releases, restarts or machines, and
//! a Prometheus relabelling rule computes the same shard for a `target` label. Discovered
//! databases are assigned one by one, by their full target name (`tenants/tenant_eu`).
//!
//! Pure: names in, shard numbers out.

use std::fmt;
use std::str::FromStr;

use md5::{Digest as _, Md5};

/// One replica's part of the fleet: shard `index` of `count` (`0/1` is the whole fleet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Default for Shard {
    /// The whole fleet: one replica owns every target.
    fn default() -> Self {
        Shard { index: 0, count: 1 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error(
        "{0:?} is not a shard: write INDEX/COUNT, e.g. \"0/3\" for the first of three replicas, or POD/COUNT with a StatefulSet pod's name, e.g. \"deploywatch-0/3\""
    )]
    Syntax(String),
    #[error("{0:?}: the number of shards must be at least 1")]
    NoShards(String),
    #[error("{text:?}: shard {index} does not exist with {count} shards (they are numbered 0 to {last})", last = .count - 1)]
    OutOfRange {
        text: String,
        index: u32,
        count: u32,
    },
}

impl Shard {
    /// Whether this replica watches the target `name`.
    pub(crate) fn owns(&self, name: &str) -> bool {
        shard_of(name, self.count) == self.index
    }

    /// True when the fleet is split (more than one shard).
    pub(crate) fn is_split(&self) -> bool {
        self.count > 1
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = ShardError;

    fn from_str(text: &str) -> Result<Shard, ShardError> {
        let syntax = || ShardError::Syntax(text.to_string());
        let (index, count) = text.trim().split_once('/').ok_or_else(syntax)?;
        let number = |part: &str| {
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(syntax());
            }
            part.parse::<u32>().map_err(|_| syntax())
        };
        // A StatefulSet pod is named after its set and its ordinal (`deploywatch-2`), so a
        // pod can say its shard with its own name: `$(POD_NAME)/3`.
        let index = index.trim();
        let ordinal = match index.rsplit_once('-') {
            Some((set, ordinal)) if !set.is_empty() => ordinal,
            _ => index,
        };
        let (index, count) = (number(ordinal)?, number(count.trim())?);
        if count == 0 {
            return Err(ShardError::NoShards(text.to_string()));
        }
        if index >= count {
            return Err(ShardError::OutOfRange {
                text: text.to_string(),
                index,
                count,
            });
        }
        Ok(Shard { index, count })
    }
}

/// The shard of `count` that owns the target `name` (Prometheus' `hashmod`).
pub fn shard_of(name: &str, count: u32) -> u32 {
    if count <= 1 {
        return 0;
    }
    let digest = Md5::digest(name.as_bytes());
    let mut tail = [0u8; 8];
    tail.copy_from_slice(&digest[8..16]);
    // The remainder is below `count`, a u32.
    (u64::from_be_bytes(tail) % u64::from(count)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(text: &str) -> Shard {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn parses_index_and_count() {
        assert_eq!(shard("0/1"), Shard::default());
        assert_eq!(shard("2/3"), Shard { index: 2, count: 3 });
        assert_eq!(shard(" 1 / 2 "), Shard { index: 1, count: 2 });
        assert_eq!(shard("1/2").to_string(), "1/2");
    }

    #[test]
    fn a_statefulset_pod_says_its_shard_with_its_name() {
        assert_eq!(shard("deploywatch-0/3"), Shard { index: 0, count: 3 });
        assert_eq!(shard("deploywatch-2/3"), Shard { index: 2, count: 3 });
        assert_eq!(
            shard("my-watch-12/16"),
            Shard {
                index: 12,
                count: 16
            }
        );
        for text in ["deploywatch/3", "deploywatch-/3", "-1/3", "deploywatch-a/3"] {
            assert!(
                matches!(text.parse::<Shard>(), Err(ShardError::Syntax(_))),
                "{text:?}"
            );
        }
        assert!(matches!(
            "deploywatch-3/3".parse::<Shard>(),
            Err(ShardError::OutOfRange {
                index: 3,
                count: 3,
                ..
            })
        ));
    }

    #[test]
    fn refuses_what_is_not_a_shard() {
        for text in [
            "", "1", "1/", "/2", "a/2", "1/b", "-1/2", "1/2/3", "+1/2", "1.0/2",
        ] {
            assert_eq!(
                text.parse::<Shard>(),
                Err(ShardError::Syntax(text.to_string())),
                "{text:?}"
            );
        }
        assert_eq!(
            "0/0".parse::<Shard>(),
            Err(ShardError::NoShards("0/0".to_string()))
        );
        let error = "2/2".parse::<Shard>().expect_err("out of range");
        assert_eq!(
            error.to_string(),
            "\"2/2\": shard 2 does not exist with 2 shards (they are numbered 0 to 1)"
        );
    }

    /// The values Prometheus' `hashmod` gives for these names (MD5, last 8 bytes, big endian):
    /// fixed forever, so an assignment never moves with a release.
    #[test]
    fn assignment_is_prometheus_hashmod() {
        let cases = [
            ("tenants/tenant_00", 1000, 528),
            ("tenants/tenant_01", 1000, 704),
            ("cognit", 1000, 998),
            ("a", 1000, 697),
            ("", 1000, 958),
            ("a", 2, 1),
            ("cognit", 7, 1),
        ];
        for (name, count, expected) in cases {
            assert_eq!(shard_of(name, count), expected, "{name:?} mod {count}");
        }
        let names: Vec<String> = (0..20).map(|i| format!("tenants/tenant_{i:02}")).collect();
        let of = |count| names.iter().map(|n| shard_of(n, count)).collect::<Vec<_>>();
        assert_eq!(
            of(2),
            [0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 1, 0, 0]
        );
        assert_eq!(
            of(3),
            [2, 0, 1, 0, 2, 1, 1, 2, 0, 0, 2, 2, 1, 0, 0, 2, 1, 0, 2, 2]
        );
    }

    #[test]
    fn every_name_has_exactly_one_owner() {
        for count in 1..=5 {
            for i in 0..200 {
                let name = format!("server/db_{i}");
                let owners = (0..count)
                    .filter(|&index| Shard { index, count }.owns(&name))
                    .count();
                assert_eq!(owners, 1, "{name} over {count} shards");
            }
        }
    }

    #[test]
    fn one_shard_owns_everything() {
        let whole = Shard::default();
        assert!(!whole.is_split());
        for name in ["", "a", "tenants/tenant_00", "x/y/z"] {
            assert!(whole.owns(name));
        }
    }

    #[test]
    fn shards_share_a_fleet_roughly_evenly() {
        let count = 4;
        let mut sizes = [0usize; 4];
        for i in 0..2000 {
            sizes[shard_of(&format!("tenants/tenant_{i}"), count) as usize] += 1;
        }
        // 500 each on average; a hash this good stays well within ±15 %.
        for size in sizes {
            assert!((425..=575).contains(&size), "{sizes:?}");
        }
    }
}
