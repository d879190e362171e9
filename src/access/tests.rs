//! The access gate against the in-memory registry: classes hold the link as they should, and
//! every request is counted under its class.

use super::*;
use crate::oci::Reference;
use crate::registry::seam::fake::{FakeBlobs, Fault, noise};
use std::time::Duration;

fn reference(d: &Digest) -> Reference {
    crate::fetch::source_reference("registry.test/repo", d).unwrap()
}

async fn drain(mut body: Body) -> usize {
    let mut n = 0;
    while let Some(b) = body.stream.next().await {
        n += b.unwrap().len();
    }
    n
}

fn policy() -> FillPolicy {
    FillPolicy {
        request_bytes: 1 << 20,
        yield_for: Duration::from_millis(200),
    }
}

#[tokio::test(start_paused = true)]
async fn a_foreground_body_keeps_the_filler_off_the_link_until_it_is_dropped() {
    let fake = Arc::new(FakeBlobs::default());
    let d = fake.add(noise(100_000, 1));
    let access = Access::new(fake.clone(), policy());
    let r = reference(&d);
    let creds = OpCreds::default();

    let body = access
        .open(Class::OnDemand, &r, &d, 10, Some(1000), &creds)
        .await
        .unwrap();
    let filler = {
        let access = Arc::clone(&access);
        tokio::spawn(async move { access.fill_turn().await })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !filler.is_finished(),
        "the read's body is still being received"
    );
    let t = tokio::time::Instant::now();
    assert_eq!(drain(body).await, 1000);
    filler.await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "and the filler waits yield_for after it: more reads of a start follow"
    );

    // A TOC (metadata) holds the link while it runs, but not after.
    let toc = access
        .open(Class::Metadata, &r, &d, 90_000, None, &creds)
        .await
        .unwrap();
    assert_eq!(drain(toc).await, 10_000);
    tokio::time::timeout(Duration::from_millis(1), access.fill_turn())
        .await
        .expect("no quiet time after a TOC");

    // A scanning reader shares the link with the filler.
    let scan = access
        .open(Class::Scan, &r, &d, 0, Some(5), &creds)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_millis(1), access.fill_turn())
        .await
        .expect("a scan does not hold the link");
    drop(scan);
}

#[tokio::test(start_paused = true)]
async fn a_fill_request_is_preempted_by_the_next_foreground_request_only() {
    let fake = Arc::new(FakeBlobs::default());
    let d = fake.add(noise(50_000, 2));
    let access = Access::new(fake.clone(), policy());
    let (r, creds) = (reference(&d), OpCreds::default());

    let fill = access
        .open(Class::Fill, &r, &d, 0, None, &creds)
        .await
        .unwrap();
    let preempted = fill.preempted();
    tokio::pin!(preempted);
    // Other fill requests and scans do not preempt it.
    let other = access.open(Class::Fill, &r, &d, 0, Some(1), &creds).await;
    let scan = access.open(Class::Scan, &r, &d, 0, Some(1), &creds).await;
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut preempted)
            .await
            .is_err()
    );
    drop((other, scan));
    let guess = access
        .open(Class::Neighbour, &r, &d, 100, Some(10), &creds)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_millis(1), &mut preempted)
        .await
        .expect("a guess after a miss is foreground: the fill gives the link up");
    drop(guess);
    // A body of another class is never preempted.
    let read = access
        .open(Class::OnDemand, &r, &d, 0, Some(10), &creds)
        .await
        .unwrap();
    let _prefetch = access
        .open(Class::Prefetch, &r, &d, 0, Some(10), &creds)
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(1), read.preempted())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn requests_and_bytes_are_counted_by_class_also_through_a_gate_over_another_source() {
    let fake = Arc::new(FakeBlobs::default());
    let d = fake.add(noise(20_000, 3));
    let access = Access::new(fake.clone(), policy());
    let (r, creds) = (reference(&d), OpCreds::default());

    let body = access
        .open(Class::Prefetch, &r, &d, 0, Some(4000), &creds)
        .await
        .unwrap();
    assert_eq!(drain(body).await, 4000);
    let toc = access
        .fetch(Class::Metadata, &r, &d, 19_000, 1000, &creds)
        .await
        .unwrap();
    assert_eq!(toc.len(), 1000);
    // A gate over another source shares the counters and the link.
    let other = Arc::new(FakeBlobs::default());
    let d2 = other.add(noise(3000, 4));
    let over = access.over(other.clone());
    let body = over
        .open(Class::Prefetch, &reference(&d2), &d2, 0, None, &creds)
        .await
        .unwrap();
    assert_eq!(drain(body).await, 3000);
    assert_eq!(access.stats.requests_of(Class::Prefetch), 2);
    assert_eq!(access.stats.bytes_of(Class::Prefetch), 7000);
    assert_eq!(access.stats.requests_of(Class::Metadata), 1);
    assert_eq!(access.stats.bytes_of(Class::Metadata), 1000);
    assert_eq!(access.stats.requests_of(Class::Fill), 0);
    assert_eq!(
        access.link().stats.foreground_requests.get(),
        3,
        "each held the link"
    );

    // A failed request is counted, and holds nothing after.
    fake.inject(Fault::Error);
    assert!(
        access
            .open(Class::OnDemand, &r, &d, 0, Some(1), &creds)
            .await
            .is_err()
    );
    assert_eq!(access.stats.requests_of(Class::OnDemand), 1);
    tokio::time::timeout(Duration::from_secs(5), access.fill_turn())
        .await
        .expect("the link is free again after yield_for");
}

#[tokio::test]
async fn warming_connections_transfers_no_byte_of_the_blob() {
    let fake = Arc::new(FakeBlobs::default());
    let d = fake.add(noise(10_000, 3));
    let access = Access::new(fake.clone(), policy());
    let creds = OpCreds::default();
    assert_eq!(access.warm(&reference(&d), &d, &creds, 4).await, 4);
    assert_eq!(crate::store::locked(&fake.touches).len(), 4);
    assert!(
        crate::store::locked(&fake.requests).is_empty(),
        "a layer stays fetched once: warming asks for no range of it"
    );
    let missing = Digest::of(b"absent");
    assert_eq!(
        access.warm(&reference(&missing), &missing, &creds, 2).await,
        0
    );
}
