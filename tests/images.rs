//! `GET /images` and `lazypull images`: the node's images (lazypull's store, containerd's CRI
//! images), two docker-registry instances (one down) and a Harbor v2.0 stand-in, paginated one
//! item per page; `images_to_ignore`; errors beside the results.

mod common;

use common::*;
use std::process::{Child, Command, Stdio};

struct Standin(Child);

impl Drop for Standin {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn harbor(port: u16) -> Standin {
    let child = Command::new("python3")
        .arg(repo_root().join("tests/harbor_standin.py"))
        .args([&port.to_string(), "admin", "Harbor12345"])
        .stdout(Stdio::null())
        .spawn()
        .expect("python3");
    wait_until(
        "the Harbor stand-in",
        std::time::Duration::from_secs(20),
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );
    Standin(child)
}

fn get(url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "60", "-w", "\n%{http_code}"])
        .arg(url)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_lists_node_and_registries_with_errors_beside_results() {
    if !require_tools() {
        return;
    }
    let reg = Registry::empty(None);
    push_one_file(&reg, "alpha", "a/a.txt", b"a\n".to_vec()).await;
    push_one_file(&reg, "team/beta", "b/b.txt", b"b\n".to_vec()).await;
    let mut down = Registry::empty(None);
    let down_host = down.host();
    down.stop();
    let hport = free_port();
    let _harbor = harbor(hport);
    // A source that accepts connections and never answers (bounded by catalog_timeout), and one
    // that answers something else than its API (a docker-registry asked as Harbor).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{}", free_port());
    let work = tempfile::tempdir().unwrap();
    let beta_id = config_digest(&reg, "team/beta");
    let cfg = format!(
        "catalog:\n  - {{url: http://{}, page_size: 1}}\n  - {{url: http://{down_host}, name: down}}\n  - {{url: http://127.0.0.1:{hport}, kind: harbor, name: harbor, page_size: 1}}\n  \
         - {{url: http://127.0.0.1:{silent_port}, name: silent}}\n  - {{url: http://{}, kind: harbor, name: not-harbor}}\n\
         registries:\n  - {{name: \"127.0.0.1:{hport}\", auth: {{user: admin, password: Harbor12345}}}}\n\
         images_to_ignore: [\"{}\"]\ncatalog_timeout: 5s\n",
        reg.host(),
        reg.host(),
        &beta_id.trim_start_matches("sha256:")[..12]
    );
    std::fs::write(work.path().join("config.yaml"), cfg).unwrap();
    let d = Daemon::start(&[
        "--mirror-listen",
        &listen,
        "--config",
        work.path().join("config.yaml").to_str().unwrap(),
    ]);
    {
        let mut c = d.client().await;
        for repo in ["alpha", "team/beta"] {
            pull(&mut c, &format!("{}/{repo}:latest", reg.host()))
                .await
                .expect("pull");
        }
    }
    let (code, body) = get(&format!("http://{listen}/images"));
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    // The node: alpha, not beta (ignored by its short id).
    let node = v["node_images"].as_array().unwrap();
    assert_eq!(node.len(), 1, "{v:#}");
    assert_eq!(node[0]["repository"], format!("{}/alpha", reg.host()));
    assert_eq!(node[0]["tag"], "latest");
    assert_eq!(node[0]["source"], "lazypull");
    assert_eq!(node[0]["image_id"].as_str().unwrap().len(), 12);
    // The registry, one item per page: both repositories, with digests and sizes.
    let regs = v["registry_images"].as_array().unwrap();
    let of = |r: &str| {
        regs.iter()
            .find(|i| i["repository"] == r && i["project"].is_null())
            .unwrap_or_else(|| panic!("{r} in {v:#}"))
    };
    for repo in ["alpha", "team/beta"] {
        let i = of(repo);
        assert_eq!(i["tag"], "latest");
        assert!(i["digest"].as_str().unwrap().starts_with("sha256:"));
        assert!(i["size"].as_str().unwrap().ends_with('B'));
    }
    // Harbor: every tag of every artifact, the untagged one as <none>, the nested repository.
    let h: Vec<(String, String, String)> = v["harbor_images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                format!(
                    "{}/{}",
                    i["project"].as_str().unwrap(),
                    i["repository"].as_str().unwrap()
                ),
                i["tag"].as_str().unwrap().to_string(),
                i["size"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for want in [
        ("library/nginx", "latest", "67.1MB"),
        ("library/nginx", "1.25", "67.1MB"),
        ("library/nginx", "<none>", "1kB"),
        ("library/team/app", "v2", "2.21GB"),
    ] {
        assert!(
            h.contains(&(want.0.into(), want.1.into(), want.2.into())),
            "{want:?} in {h:?}"
        );
    }
    assert_eq!(h.len(), 4);
    // The registry that is down is an error beside the results.
    let errors: Vec<&str> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(errors.len(), 3, "{errors:?}");
    for name in ["down", "silent", "not-harbor"] {
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with(&format!("registry {name}:"))),
            "{name} in {errors:?}"
        );
    }
    drop(silent);
    // The table, through the CLI.
    let out = Command::new(bin())
        .args(["images", "--server", &format!("http://{listen}")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.starts_with("SOURCE"), "{text}");
    assert!(
        text.contains("library/team/app") && text.contains("error: registry down"),
        "{text}"
    );
}

/// containerd's CRI images are listed as the node's, as crictl shows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_images_are_node_images() {
    if !require_tools() || !Containerd::available() {
        return;
    }
    let reg = Registry::empty(None);
    push_one_file(&reg, "ctd-img", "c/c.txt", b"c\n".to_vec()).await;
    let ctd = Containerd::start(&[reg.host()]);
    let image = format!("{}/ctd-img:latest", reg.host());
    ctd.ctr(&["-n", "k8s.io", "images", "pull", "--plain-http", &image]);
    let listen = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start(&[
        "--mirror-listen",
        &listen,
        "--containerd-address",
        ctd.socket.to_str().unwrap(),
    ]);
    let (code, body) = get(&format!("http://{listen}/images"));
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let c = v["containerd_images"].as_array().unwrap();
    let found = c
        .iter()
        .find(|i| i["repository"] == format!("{}/ctd-img", reg.host()))
        .unwrap_or_else(|| panic!("{v:#}"));
    assert_eq!(found["tag"], "latest");
    assert_eq!(
        found["image_id"],
        config_digest(&reg, "ctd-img").trim_start_matches("sha256:")[..12]
    );
    assert_eq!(found["source"], "containerd");
    assert!(v["errors"].as_array().unwrap().is_empty(), "{v:#}");
    drop(d);
}
