//! permessage-deflate: what compressing the chat page's typical messages
//! costs, per frame and per delivery (a broadcast is compressed once for
//! all its members), and the deflate backends side by side (flate2 on
//! zlib-rs, which the hub uses, and miniz_oxide).
//!
//! Figures in BENCHMARKS.md, "Compression".

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use flate2::{Compress, Compression, FlushCompress};
use miniz_oxide::deflate::core::{
    compress as miniz_compress, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush,
};
use std::hint::black_box;

const WORDS: &str = "see you at the standup in five minutes, bring the notes from \
    yesterday and the numbers for the release plan so we can decide what ships this week \
    and what waits for the next one because nobody wants another late night";

/// A `message` frame as the hub sends it for the chat page, `text` long.
fn chat_frame(text_len: usize) -> String {
    let text = &WORDS[..text_len];
    format!(
        r#"{{"type":"message","room":"lobby","offset":1042,"id":"4be0c1d2e3f4a5b7","user":"alice","data":{{"text":"{text}"}},"ts":1763900000000}}"#
    )
}

/// The two typical sizes: a short line (146 bytes) and a long one (340).
fn frames() -> Vec<String> {
    let frames = vec![chat_frame(22), chat_frame(216)];
    assert_eq!((frames[0].len(), frames[1].len()), (146, 340));
    frames
}

fn backends(c: &mut Criterion) {
    let mut group = c.benchmark_group("deflate_backend");
    group.throughput(Throughput::Elements(1));
    for frame in frames() {
        let payload = frame.as_bytes();
        let mut out = Vec::with_capacity(1024);
        for level in [1u32, 2] {
            let mut zlib = Compress::new(Compression::new(level), false);
            group.bench_with_input(
                BenchmarkId::new(format!("zlib_rs_level{level}"), payload.len()),
                payload,
                |b, payload| {
                    b.iter(|| {
                        zlib.reset();
                        out.clear();
                        zlib.compress_vec(black_box(payload), &mut out, FlushCompress::Sync)
                            .unwrap();
                        out.len()
                    })
                },
            );
        }
        let mut miniz = CompressorOxide::new(create_comp_flags_from_zip_params(1, -15, 0));
        let mut buf = vec![0u8; 1024];
        group.bench_with_input(
            BenchmarkId::new("miniz_oxide_level1", payload.len()),
            payload,
            |b, payload| {
                b.iter(|| {
                    miniz.reset();
                    miniz_compress(&mut miniz, black_box(payload), &mut buf, TDEFLFlush::Sync).2
                })
            },
        );
    }
    group.finish();
}

fn hub(c: &mut Criterion) {
    let mut group = c.benchmark_group("compress_frame");
    group.throughput(Throughput::Elements(1));
    for frame in frames() {
        let mut out = Vec::with_capacity(1024);
        group.bench_with_input(
            BenchmarkId::from_parameter(frame.len()),
            frame.as_bytes(),
            |b, payload| {
                b.iter(|| {
                    out.clear();
                    roomhub::deflate::compress(black_box(payload), &mut out);
                    out.len()
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, backends, hub);
criterion_main!(benches);
