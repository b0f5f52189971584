//! Cabinet codec throughput: decode and encode of a heartbeat and of a 16-lane weight report,
//! the two frames a fleet sends most. `cargo bench -p protocol --bench codec`; figures in
//! BENCHMARKS.md.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use protocol::cabinet::{self, Frame, Heartbeat, LaneWeight, MAX_PAYLOAD_LEN, Message, WeightReport};

fn heartbeat() -> Frame {
    Frame::new(42, Message::Heartbeat(Heartbeat { device_time_ms: 1_700_000_000_000 }))
}

fn weight_report_16() -> Frame {
    let lanes = (1..=16).map(|i| LaneWeight { lane_id: i, grams: 1_250 * i32::from(i), stable: i % 3 != 0 }).collect();
    Frame::new(43, Message::WeightReport(WeightReport { door_id: 1, sample_time_ms: 1_700_000_000_300, lanes }))
}

fn bench_frame(c: &mut Criterion, name: &str, frame: &Frame) {
    let mut wire = BytesMut::new();
    cabinet::encode(frame, &mut wire).expect("encodable");
    let wire = wire.freeze();

    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode", |b| {
        let mut buf = BytesMut::with_capacity(wire.len());
        b.iter(|| {
            buf.clear();
            buf.extend_from_slice(&wire);
            black_box(cabinet::decode(&mut buf, MAX_PAYLOAD_LEN).expect("valid"))
        });
    });
    group.bench_function("encode", |b| {
        let mut buf = BytesMut::with_capacity(wire.len());
        b.iter(|| {
            buf.clear();
            cabinet::encode(black_box(frame), &mut buf).expect("encodable");
            black_box(buf.len())
        });
    });
    group.finish();
}

fn codec(c: &mut Criterion) {
    bench_frame(c, "heartbeat", &heartbeat());
    bench_frame(c, "weight_report_16_lanes", &weight_report_16());
}

criterion_group!(benches, codec);
criterion_main!(benches);
