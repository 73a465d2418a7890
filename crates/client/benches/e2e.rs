//! What end-to-end protection costs per message and per key: signing, sealing and opening a
//! 100-byte text (format v2), and one Argon2id derivation with the v2 default and the v1
//! parameters. Run: `cargo bench -p cellchat-client --bench e2e`.

use std::hint::black_box;

use cellchat_client::crypto::{
    open_message, seal_v2, sign_plain, Argon2Params, ChannelKey, ChannelKeyV2, Keys,
};
use cellchat_client::Identity;
use criterion::{criterion_group, criterion_main, Criterion};

const CLUSTER: &str = "bench";
const CHANNEL: &str = "general";
const CLIENT_ID: [u8; 16] = [7; 16];

fn text_100() -> String {
    "x".repeat(100)
}

fn per_message(c: &mut Criterion) {
    let id = Identity::ephemeral("alice", Some([1; 32]));
    let pinned = Some(id.public_key());
    let (key, _) = ChannelKeyV2::create("bench passphrase", CLUSTER, CHANNEL).expect("create");
    let keys = Keys {
        v2: Some(key.clone()),
        v1: None,
    };
    let text = text_100();
    let mut group = c.benchmark_group("e2e");
    group.bench_function("sign_plain/100B", |b| {
        b.iter(|| sign_plain(&id, CLUSTER, CHANNEL, CLIENT_ID, 1, black_box(&text)))
    });
    group.bench_function("seal_v2/100B", |b| {
        b.iter(|| seal_v2(&key, &id, CLUSTER, CHANNEL, CLIENT_ID, 1, black_box(&text)))
    });
    let sealed = seal_v2(&key, &id, CLUSTER, CHANNEL, CLIENT_ID, 1, &text).expect("seal");
    group.bench_function("open_message/encrypted/100B", |b| {
        b.iter(|| {
            open_message(
                &keys,
                CLUSTER,
                CHANNEL,
                "alice",
                1,
                pinned,
                black_box(&sealed),
            )
        })
    });
    let signed = sign_plain(&id, CLUSTER, CHANNEL, CLIENT_ID, 1, &text).expect("sign");
    group.bench_function("open_message/signed/100B", |b| {
        b.iter(|| {
            open_message(
                &keys,
                CLUSTER,
                CHANNEL,
                "alice",
                1,
                pinned,
                black_box(&signed),
            )
        })
    });
    group.finish();
}

fn per_key(c: &mut Criterion) {
    let (_, record) = ChannelKeyV2::create("bench passphrase", CLUSTER, CHANNEL).expect("create");
    let v2 = Argon2Params::V2_DEFAULT;
    let v1 = Argon2Params::V1;
    let mut group = c.benchmark_group("argon2id");
    group.sample_size(10);
    let v2_id = format!(
        "unlock_v2/m={}KiB,t={},p={}",
        v2.memory_kib, v2.passes, v2.lanes
    );
    group.bench_function(v2_id, |b| {
        b.iter(|| ChannelKeyV2::unlock("bench passphrase", CLUSTER, CHANNEL, black_box(&record)))
    });
    let v1_id = format!(
        "derive_v1/m={}KiB,t={},p={}",
        v1.memory_kib, v1.passes, v1.lanes
    );
    group.bench_function(v1_id, |b| {
        b.iter(|| ChannelKey::derive(black_box("bench passphrase"), CLUSTER, CHANNEL))
    });
    group.finish();
}

criterion_group!(benches, per_message, per_key);
criterion_main!(benches);
