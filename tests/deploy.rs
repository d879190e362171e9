//! The Kubernetes manifests in deploy/: each config they mount is a valid lazypull config, and
//! the fields that must agree with it do (probes on the health port, the ports the mirror and
//! peers use, the store and FUSE mount volumes, the privileges FUSE needs).

use lazypull::config::Config;
use serde_yaml_ng::Value;
use std::path::{Path, PathBuf};

fn docs(file: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("read manifest");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML document"))
        .collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

/// The ConfigMap's config.yaml, loaded and validated as the daemon does.
fn config(docs: &[Value]) -> Config {
    let text = s(&kind(docs, "ConfigMap")["data"]["config.yaml"]);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.yaml");
    std::fs::write(&p, text).unwrap();
    let cfg = Config::load(Some(&p)).expect("config parses");
    cfg.validate().expect("config validates");
    cfg
}

fn port(listen: &str) -> u64 {
    listen.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// The pod's container, its volumes by name, and the host or claim each is.
fn pod(workload: &Value) -> (&Value, &Vec<Value>) {
    let spec = &workload["spec"]["template"]["spec"];
    (
        &spec["containers"][0],
        spec["volumes"].as_sequence().expect("volumes"),
    )
}

/// The volume mounted at `path` (or at a parent of it), and its mount entry.
fn mount_of<'a>(container: &'a Value, volumes: &'a [Value], path: &Path) -> (&'a Value, &'a Value) {
    let mounts = container["volumeMounts"].as_sequence().expect("mounts");
    let m = mounts
        .iter()
        .filter(|m| path.starts_with(s(&m["mountPath"])))
        .max_by_key(|m| s(&m["mountPath"]).len())
        .unwrap_or_else(|| panic!("nothing mounted at {}", path.display()));
    let v = volumes
        .iter()
        .find(|v| v["name"] == m["name"])
        .expect("the mount's volume");
    (m, v)
}

fn probes_on(container: &Value, health_port: u64) {
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let p = &container[probe]["httpGet"];
        assert_eq!(s(&p["path"]), path, "{probe}");
        assert_eq!(
            p["port"].as_u64(),
            Some(health_port),
            "{probe} on the health port"
        );
    }
}

fn container_ports(container: &Value) -> Vec<u64> {
    container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_u64().unwrap())
        .collect()
}

/// The config file the container reads is the ConfigMap's.
fn reads_the_config_map(container: &Value, volumes: &[Value], map: &str) {
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(s)
        .collect();
    let at = args
        .iter()
        .position(|a| *a == "--config")
        .expect("--config");
    let file = PathBuf::from(args[at + 1]);
    let (_, v) = mount_of(container, volumes, &file);
    assert_eq!(s(&v["configMap"]["name"]), map);
    assert_eq!(file.file_name().unwrap(), "config.yaml");
    assert!(args.contains(&"serve"));
}

#[test]
fn node_agent_daemonset_agrees_with_its_config() {
    let d = docs("node-agent.yaml");
    let cfg = config(&d);
    let ds = kind(&d, "DaemonSet");
    let (c, volumes) = pod(ds);
    reads_the_config_map(c, volumes, "lazypull-node");
    assert_eq!(c["securityContext"]["privileged"], true, "FUSE needs it");
    probes_on(c, port(&cfg.health.listen));
    let ports = container_ports(c);
    assert!(ports.contains(&port(&cfg.mirror.listen)));
    assert!(ports.contains(&port(&cfg.health.listen)));
    // The store and the sockets on the host; the FUSE mount propagates back to it.
    let (_, store) = mount_of(c, volumes, &cfg.root);
    assert!(
        store["hostPath"]["path"].is_string(),
        "the store is on the host"
    );
    let (m, run) = mount_of(c, volumes, &cfg.fuse.mountpoint);
    assert_eq!(s(&m["mountPropagation"]), "Bidirectional");
    assert!(run["hostPath"].is_mapping());
    for socket in [&cfg.cri.socket, &cfg.snapshotter.socket] {
        let (_, v) = mount_of(c, volumes, socket);
        assert!(
            v["hostPath"].is_mapping(),
            "{} on the host",
            socket.display()
        );
    }
    let (_, fuse) = mount_of(c, volumes, Path::new("/dev/fuse"));
    assert_eq!(s(&fuse["hostPath"]["type"]), "CharDevice");
    let ctd = cfg.containerd.address.as_ref().expect("containerd address");
    let (_, v) = mount_of(c, volumes, ctd);
    assert!(v["hostPath"].is_mapping());
    // peers.dns names the headless Service of these pods, on the mirror's port.
    let svc = kind(&d, "Service");
    assert!(svc["spec"]["clusterIP"] == "None", "headless");
    let (host, p) = cfg.peers.dns.rsplit_once(':').unwrap();
    assert!(host.starts_with(&format!(
        "{}.{}.",
        s(&svc["metadata"]["name"]),
        s(&svc["metadata"]["namespace"])
    )));
    assert_eq!(p.parse::<u64>().unwrap(), port(&cfg.mirror.listen));
    assert_eq!(
        svc["spec"]["selector"],
        ds["spec"]["template"]["metadata"]["labels"]
    );
    assert_eq!(ds["spec"]["template"]["spec"]["hostNetwork"], true);
}

#[test]
fn registry_deployment_agrees_with_its_config() {
    let d = docs("registry.yaml");
    let cfg = config(&d);
    let dep = kind(&d, "Deployment");
    let (c, volumes) = pod(dep);
    reads_the_config_map(c, volumes, "lazypull-registry");
    probes_on(c, port(&cfg.health.listen));
    assert!(!cfg.fuse.enabled && !cfg.snapshotter.enabled);
    // The store on the claim.
    let (_, data) = mount_of(c, volumes, &cfg.root);
    let claim = s(&data["persistentVolumeClaim"]["claimName"]);
    let pvc = kind(&d, "PersistentVolumeClaim");
    assert_eq!(s(&pvc["metadata"]["name"]), claim);
    assert_eq!(dep["spec"]["replicas"], 1, "one writer per store");
    // The Service reaches the mirror's port.
    let svc = kind(&d, "Service");
    assert_eq!(s(&svc["spec"]["type"]), "ClusterIP");
    let target = svc["spec"]["ports"][0]["targetPort"].as_u64().unwrap();
    assert_eq!(target, port(&cfg.mirror.listen));
    assert!(container_ports(c).contains(&target));
    assert_eq!(
        svc["spec"]["selector"],
        dep["spec"]["template"]["metadata"]["labels"]
    );
    // The admin API stays on the pod's loopback (no token configured).
    let admin: std::net::SocketAddr = cfg.mirror.admin_listen.parse().unwrap();
    assert!(admin.ip().is_loopback());
}
