//! A tiny deterministic pseudo-random generator (SplitMix64). The core draws
//! its randomized election timeouts from it, seeded by the driver, so a run
//! is a pure function of its inputs.

/// SplitMix64 (Steele, Lea, Flood 2014): 64 bits of state, passes BigCrush,
/// and every seed (including 0) gives a full-period sequence.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `[low, high)`. Requires `low < high`.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        assert!(low < high, "empty range {low}..{high}");
        low + self.next_u64() % (high - low)
    }

    /// True with probability `numerator / denominator`.
    pub fn chance(&mut self, numerator: u64, denominator: u64) -> bool {
        self.range(0, denominator) < numerator
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference outputs of SplitMix64 (Vigna's splitmix64.c): a changed shift, mask or
    /// constant changes them, though the draws would still look random.
    #[test]
    fn draws_match_the_reference_splitmix64() {
        let mut rng = SplitMix64::new(1234567);
        let draws: Vec<u64> = (0..5).map(|_| rng.next_u64()).collect();
        assert_eq!(
            draws,
            [
                6457827717110365317,
                3203168211198807973,
                9817491932198370423,
                4593380528125082431,
                16408922859458223821
            ]
        );
        let mut zero = SplitMix64::new(0);
        assert_eq!(zero.next_u64(), 16294208416658607535);
        assert_eq!(zero.next_u64(), 7960286522194355700);
    }

    #[test]
    fn range_covers_its_bounds_and_nothing_else() {
        let mut rng = SplitMix64::new(7);
        let draws: Vec<u64> = (0..1000).map(|_| rng.range(5, 8)).collect();
        assert!(draws.iter().all(|d| (5..8).contains(d)), "{draws:?}");
        for value in 5..8 {
            assert!(draws.contains(&value), "{value} never drawn");
        }
    }

    #[test]
    #[should_panic(expected = "empty range")]
    fn an_empty_range_is_refused() {
        SplitMix64::new(1).range(3, 3);
    }

    #[test]
    fn chance_follows_its_odds() {
        let mut rng = SplitMix64::new(9);
        assert!((0..100).all(|_| !rng.chance(0, 4)));
        assert!((0..100).all(|_| rng.chance(4, 4)));
        let hits = (0..1000).filter(|_| rng.chance(1, 4)).count();
        assert!((200..300).contains(&hits), "{hits} of 1000 at 1/4");
    }
}
