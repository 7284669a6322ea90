//! Any bytes a client can send after a completed handshake, cut into reads
//! anyhow, through the session's own frame reader: it yields whole messages
//! and control frames or one violation, never panics, never holds (nor
//! allocates) more than the frame limit allows, whatever lengths the frame
//! headers declare, and leaves nothing allocated behind it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roomhub::session::frames::{FrameReader, Inbound, MAX_HEADER_BYTES};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Counts the bytes Rust code has allocated, and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Relaxed) + bytes;
    PEAK.fetch_max(live, Relaxed);
}

// SAFETY: every call is forwarded unchanged to the system allocator; only
// counters are updated around it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Old and new blocks may both be live while the bytes are copied.
        grew(new_size);
        let new = System.realloc(ptr, layout, new_size);
        LIVE.fetch_sub(layout.size(), Relaxed);
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fuzz_target!(|data: &[u8]| {
    // The first two bytes pick the limit (small, so declared lengths around
    // it are reachable) and the size of the reads the bytes arrive in.
    let Some((&[limit, read], wire)) = data.split_first_chunk::<2>() else {
        return;
    };
    let limit = 1 + (usize::from(limit) << 4);
    let read = 1 + usize::from(read) * 4;
    // What a reader may hold: a partial frame within the limit (a control
    // frame may carry 125 bytes whatever the limit) plus one read, with the
    // buffer's growth and its smallest allocation, and a message reassembled
    // within the limit.
    let frame_max = limit.max(125);
    let held_bound = 2 * (MAX_HEADER_BYTES + frame_max + read) + limit + 64;
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);

    let mut reader = FrameReader::new(limit, &[]);
    'reads: for piece in wire.chunks(read) {
        reader.feed(piece);
        // Bounded: every item consumes at least a frame header.
        for _ in 0..=piece.len() + MAX_HEADER_BYTES {
            match reader.next_inbound() {
                Ok(Some(Inbound::Text(text))) => assert!(text.len() <= limit),
                Ok(Some(Inbound::Ping(payload))) => assert!(payload.len() <= 125),
                Ok(Some(Inbound::Binary | Inbound::Pong | Inbound::Close(_))) => {}
                Ok(None) => {
                    assert!(reader.held_bytes() <= held_bound, "held {}", reader.held_bytes());
                    continue 'reads;
                }
                Err(_) => {
                    // A failed connection holds nothing and reads nothing more.
                    assert_eq!(reader.held_bytes(), 0);
                    reader.feed(wire);
                    assert_eq!(reader.next_inbound(), Ok(None));
                    break 'reads;
                }
            }
        }
        unreachable!("more items than frame headers");
    }
    drop(reader);
    let peak = PEAK.load(Relaxed) - base;
    // Allocations besides the buffers (shared-buffer handles) are small.
    assert!(peak <= held_bound + 4096, "allocated {peak} bytes, limit {limit}");
    assert_eq!(LIVE.load(Relaxed), base, "nothing outlives the reader");
});
