//! The machine's memory read bandwidth, measured where the benchmark runs
//! (the floor a decode step cannot beat: every weight byte read once per
//! token): `threads` threads each summing their share of a buffer far
//! larger than any cache, best of a few passes.

use std::time::Instant;

/// Bytes of the buffer read: 1 GiB, well past the last-level caches.
const BUFFER_BYTES: usize = 1 << 30;

/// Read bandwidth in bytes/s over `threads` threads (best of `passes`).
pub fn read_bandwidth(threads: usize, passes: usize) -> f64 {
    let words = BUFFER_BYTES / 8;
    // Distinct, non-zero words so no page is shared or compressed.
    let buf: Vec<u64> = (0..words as u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
        .collect();
    let threads = threads.max(1);
    let share = words.div_ceil(threads);
    let mut best = 0f64;
    for _ in 0..passes.max(1) {
        let start = Instant::now();
        let sum = std::thread::scope(|s| {
            let parts: Vec<_> = buf
                .chunks(share)
                .map(|part| s.spawn(move || part.iter().fold(0u64, |a, &b| a.wrapping_add(b))))
                .collect();
            parts
                .into_iter()
                .fold(0u64, |a, h| a.wrapping_add(h.join().unwrap_or(0)))
        });
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max(BUFFER_BYTES as f64 / secs);
    }
    best
}

#[cfg(test)]
mod tests {
    #[test]
    fn bandwidth_is_a_plausible_rate() {
        let bw = super::read_bandwidth(2, 1);
        // Between 100 MB/s and 10 TB/s on any machine that runs the tests.
        assert!((1e8..1e13).contains(&bw), "{bw}");
    }
}
