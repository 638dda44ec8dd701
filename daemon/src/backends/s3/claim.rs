//! The claim: which daemon may write the volume, and for how long. One
//! small object, `PREFIX/claim`, always replaced with a conditional write:
//!
//! ```text
//! holdfast-s3-claim 1
//! owner LINEAGE NONCE HOST PID
//! term MS
//! renewal N
//! released 0|1
//! ```
//!
//! The holder renews it every third of its term (`renewal` counts, so each
//! body differs) and stops acknowledging writes and flushes, and serving
//! reads, once a term has passed since the start of its last successful
//! renewal, as its own monotonic clock measures. A daemon of another cache
//! directory takes the claim only once the holder released it (a clean
//! detach) or once it has seen the object unchanged for the holder's term
//! plus a tenth, on its own monotonic clock: by then the holder has stopped.
//! Only the rate of the two clocks matters, not their time of day: it is
//! assumed they drift apart by less than a tenth over a term. A daemon of
//! the same cache directory (a handoff successor, a restart) holds the
//! directory's flock lease, so its predecessor is gone: it takes the claim
//! at once.

use super::manifest::{Owner, is_token};

pub const CLAIM: &str = "claim";
const FORMAT: &str = "holdfast-s3-claim 1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub owner: Owner,
    /// How long the holder may go without a renewal, in milliseconds.
    pub term_ms: u64,
    pub renewal: u64,
    /// The holder gave the claim up (a clean detach).
    pub released: bool,
}

impl Claim {
    pub fn encode(&self) -> Vec<u8> {
        let o = &self.owner;
        format!(
            "{FORMAT}\nowner {} {} {} {}\nterm {}\nrenewal {}\nreleased {}\n",
            o.lineage,
            o.nonce,
            o.host,
            o.pid,
            self.term_ms,
            self.renewal,
            u8::from(self.released)
        )
        .into_bytes()
    }

    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(body).map_err(|_| "the claim is not UTF-8")?;
        let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split(' ').collect()).collect();
        let number = |v: &str, what: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("claim {what} {v:?} is not a number"))
        };
        match &lines[..] {
            [format, owner, term, renewal, released]
                if format.join(" ") == FORMAT
                    && term.first() == Some(&"term")
                    && renewal.first() == Some(&"renewal")
                    && released.first() == Some(&"released") =>
            {
                let owner = match owner[..] {
                    ["owner", lineage, nonce, host, pid]
                        if [lineage, nonce, host].iter().all(|t| is_token(t)) =>
                    {
                        Owner {
                            lineage: lineage.into(),
                            nonce: nonce.into(),
                            host: host.into(),
                            pid: pid.parse().map_err(|_| "claim owner: bad pid")?,
                        }
                    }
                    _ => return Err("claim owner: expected LINEAGE NONCE HOST PID".into()),
                };
                let field = |l: &[&str], what| match l {
                    [_, v] => number(v, what),
                    _ => Err(format!("claim {what}: expected one number")),
                };
                let term_ms = field(term, "term")?;
                if term_ms == 0 {
                    return Err("claim term: must be positive".into());
                }
                Ok(Self {
                    owner,
                    term_ms,
                    renewal: field(renewal, "renewal")?,
                    released: match field(released, "released")? {
                        0 => false,
                        1 => true,
                        _ => return Err("claim released: 0 or 1".into()),
                    },
                })
            }
            _ => Err(format!("not a claim in format {FORMAT:?}")),
        }
    }

    /// How long a claimant must see this claim unchanged before the holder
    /// has stopped: its term, plus a tenth for the clocks' drift.
    pub fn lapse(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.term_ms.saturating_add(self.term_ms / 10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Claim {
        Claim {
            owner: Owner {
                lineage: "ab12".into(),
                nonce: "cd34".into(),
                host: "host-1".into(),
                pid: 42,
            },
            term_ms: 30_000,
            renewal: 7,
            released: false,
        }
    }

    #[test]
    fn round_trip_and_refusals() {
        let c = sample();
        assert_eq!(Claim::parse(&c.encode()), Ok(c.clone()));
        assert_eq!(c.lapse().as_millis(), 33_000);
        let good = String::from_utf8(c.encode()).unwrap();
        for (from, to) in [
            ("holdfast-s3-claim 1", "holdfast-s3-claim 2"),
            ("term 30000", "term 0"),
            ("term 30000", "term x"),
            ("released 0", "released 2"),
            ("owner ab12 cd34 host-1 42", "owner ab12"),
            ("renewal 7\n", ""),
        ] {
            let bad = good.replace(from, to);
            assert_ne!(bad, good, "{from}");
            assert!(Claim::parse(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
