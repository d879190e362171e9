//! Compile the gRPC APIs we serve and call from our own .proto files (no system protoc).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/cri/api.proto",
        "proto/lazypull/control.proto",
        "proto/containerd/github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto",
        "proto/containerd/github.com/containerd/containerd/api/types/mount.proto",
        "proto/containerd/github.com/containerd/containerd/api/types/descriptor.proto",
        "proto/containerd/github.com/containerd/containerd/api/services/content/v1/content.proto",
        "proto/containerd/github.com/containerd/containerd/api/services/images/v1/images.proto",
        "proto/containerd/github.com/containerd/containerd/api/services/leases/v1/leases.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto/cri", "proto/lazypull", "proto/containerd"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
