//! Giving freed heap back to the operating system after a burst.
//!
//! glibc's allocator keeps what a burst freed (100 000 rooms created and
//! stopped: RSS stayed at 485 MB, and each further flood ratcheted it up;
//! a `malloc_trim(0)` took it to 36 MB, so it was retention, not a leak).
//! [`Trimmer`] watches the number of rooms and connections and trims once
//! they have fallen well below their high-water mark, so a quiet hub does not
//! keep the footprint of its busiest minute. Trimming walks the allocator's
//! arenas, so it runs on a blocking thread and only after a large fall.

/// A fall smaller than this (rooms + connections) is not worth a trim.
const MIN_FALL: usize = 1000;

/// Decides when to trim, from periodic counts.
#[derive(Debug, Default)]
pub struct Trimmer {
    high_water: usize,
}

impl Trimmer {
    /// Takes the most rooms and connections there were at once since the
    /// last call (`peak`) and how many there are now (`live`); true when the
    /// heap should be trimmed now (the count fell to half its high-water
    /// mark, by at least [`MIN_FALL`]).
    pub fn observe(&mut self, peak: usize, live: usize) -> bool {
        self.high_water = self.high_water.max(peak).max(live);
        let fell = self.high_water - live;
        if fell >= MIN_FALL && live <= self.high_water / 2 {
            self.high_water = live;
            return true;
        }
        false
    }
}

/// Returns the allocator's free memory to the OS (glibc only; elsewhere the
/// allocator is left to itself). Blocks: call it off the actors' threads.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas; any pad is valid.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_after_a_large_fall_and_not_for_small_ones() {
        let mut t = Trimmer::default();
        assert!(!t.observe(100, 100));
        assert!(!t.observe(100, 60), "a small fall");
        assert!(!t.observe(100_000, 100_000));
        assert!(!t.observe(100_000, 60_000), "not yet half");
        assert!(t.observe(60_000, 10));
        assert!(!t.observe(10, 10), "once per fall");
        // A burst that came and went between two looks still counts.
        assert!(t.observe(50_000, 0));
    }
}
