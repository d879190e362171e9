//! Run the same CRI image scenarios against containerd's own CRI image service and lazypull, and
//! assert both answer alike wherever CRI defines the answer. Keeps our protos and semantics honest.

mod common;

use common::*;
use lazypull::rpc::cri;

/// What CRI defines about an image, normalised for comparison.
#[derive(Debug, PartialEq, Eq)]
struct View {
    id: String,
    repo_tags: Vec<String>,
    repo_digests: Vec<String>,
    uid: Option<i64>,
    username: String,
}

fn view(i: cri::Image) -> View {
    let mut repo_tags = i.repo_tags;
    repo_tags.sort();
    let mut repo_digests = i.repo_digests;
    repo_digests.sort();
    View {
        id: i.id,
        repo_tags,
        repo_digests,
        uid: i.uid.map(|u| u.value),
        username: i.username,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_answers_as_containerd() {
    if !require_tools() || !Containerd::available() {
        return;
    }
    let reg = Registry::with_fixtures(None);
    let host = reg.host();
    let ctd = Containerd::start(std::slice::from_ref(&host));
    let lp = Daemon::start(&[]);
    let mut a = ctd.images().await;
    let mut b = lp.client().await;

    for repo in [
        "busybox",
        "user-numeric",
        "user-named",
        "multiarch",
        "multilayer",
    ] {
        let name = format!("{host}/{repo}:latest");
        let ida = pull(&mut a, &name)
            .await
            .unwrap_or_else(|e| panic!("containerd pull {name}: {e:?}"));
        let idb = pull(&mut b, &name)
            .await
            .unwrap_or_else(|e| panic!("lazypull pull {name}: {e:?}"));
        assert_eq!(ida, idb, "PullImage image_ref of {repo}");
        let va = view(status(&mut a, &name).await.expect("containerd status"));
        let vb = view(status(&mut b, &name).await.expect("lazypull status"));
        assert_eq!(va, vb, "ImageStatus of {repo}");
        // By id, truncated id and repo digest.
        let short = &ida.trim_start_matches("sha256:")[..12];
        for q in [ida.clone(), short.to_string(), va.repo_digests[0].clone()] {
            let ia = status(&mut a, &q).await.map(|i| i.id);
            let ib = status(&mut b, &q).await.map(|i| i.id);
            assert_eq!(ia, ib, "ImageStatus({q})");
        }
    }
    // Pull by digest adds no tag, on a fresh repository (both).
    let digest_name = {
        let out = std::process::Command::new("skopeo")
            .args(["inspect", "--tls-verify=false", "--format", "{{.Digest}}"])
            .arg(format!("docker://{host}/shared-a:latest"))
            .output()
            .expect("skopeo");
        format!(
            "{host}/shared-a@{}",
            String::from_utf8_lossy(&out.stdout).trim()
        )
    };
    let ida = pull(&mut a, &digest_name)
        .await
        .expect("containerd pull by digest");
    let idb = pull(&mut b, &digest_name)
        .await
        .expect("lazypull pull by digest");
    assert_eq!(ida, idb);
    let va = view(status(&mut a, &ida).await.expect("containerd"));
    let vb = view(status(&mut b, &idb).await.expect("lazypull"));
    assert!(va.repo_tags.is_empty(), "containerd adds no tag: {va:?}");
    assert_eq!(va, vb, "ImageStatus after pull by digest");
    // Absent images: empty ImageStatus; RemoveImage succeeds.
    let absent = format!("{host}/nothing:here");
    assert!(status(&mut a, &absent).await.is_none());
    assert!(status(&mut b, &absent).await.is_none());
    remove(&mut a, &absent)
        .await
        .expect("containerd remove absent");
    remove(&mut b, &absent)
        .await
        .expect("lazypull remove absent");
    // Same set of image ids listed.
    let mut la: Vec<String> = list(&mut a).await.into_iter().map(|i| i.id).collect();
    let mut lb: Vec<String> = list(&mut b).await.into_iter().map(|i| i.id).collect();
    la.sort();
    lb.sort();
    assert_eq!(la, lb, "ListImages ids");
    // Remove by id: gone from both.
    remove(&mut a, &ida).await.unwrap();
    remove(&mut b, &idb).await.unwrap();
    assert!(status(&mut a, &ida).await.is_none());
    assert!(status(&mut b, &idb).await.is_none());
}
