//! The QEMU command line for one VM: a pure function of the spec, the VM's
//! paths and the host's capabilities, so it can be tested without QEMU.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::config::Accel;
use super::layout::VmPaths;
use crate::{BootSpec, DriverError, NicSpec, VmSpec, MAX_VOLUMES_PER_VM};

/// Host-dependent choices for the command line.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LaunchOptions {
    pub accel: Accel,
    /// QEMU has seccomp (`-sandbox`).
    pub sandbox: bool,
}

/// The disk as the command line opens it: every layer of the VM's chain
/// (see `snapshot.rs`) as its own `-blockdev` with a node name the driver
/// chose, so live snapshot operations can address each of them.
#[derive(Clone, Debug)]
pub(crate) struct DiskLaunch {
    /// Node name, file and format of the base image the bottom layer is
    /// backed by; `None` for a standalone bottom layer (a restored disk).
    /// Opened read-only: it is shared and never written.
    pub base: Option<(String, PathBuf, String)>,
    /// Bottom to top; the last one is the active layer the device uses.
    pub layers: Vec<DiskLayer>,
}

/// One qcow2 layer of the disk.
#[derive(Clone, Debug)]
pub(crate) struct DiskLayer {
    pub node: String,
    pub path: PathBuf,
    /// The layer the VM writes to; all others are opened read-only.
    pub active: bool,
}

/// Escapes a value for QEMU's `key=value,...` option syntax (a comma is
/// written twice).
fn opt_value(s: &str) -> String {
    s.replace(',', ",,")
}

fn utf8_path<'a>(spec: &VmSpec, what: &str, p: &'a Path) -> Result<&'a str, DriverError> {
    p.to_str().ok_or_else(|| DriverError::InvalidSpec {
        id: spec.id,
        reason: format!("{what} path {} is not UTF-8", p.display()),
    })
}

/// A unix socket chardev that QEMU serves and the driver connects to.
fn socket_chardev(id: &str, path: &str) -> String {
    format!("socket,id={id},path={},server=on,wait=off", opt_value(path))
}

/// The kernel command line, with `console=ttyS0` added unless it names a console.
pub(crate) fn kernel_cmdline(cmdline: &str) -> String {
    if cmdline
        .split_whitespace()
        .any(|w| w.starts_with("console="))
    {
        cmdline.to_string()
    } else if cmdline.trim().is_empty() {
        "console=ttyS0".to_string()
    } else {
        format!("{} console=ttyS0", cmdline.trim())
    }
}

/// Arguments for `qemu-system-x86_64` (without the binary itself).
///
/// The VM starts paused (`-S`): the driver attaches to the console socket
/// first and then issues QMP `cont`, so no boot output is lost.
pub(crate) fn qemu_args(
    spec: &VmSpec,
    paths: &VmPaths,
    disk: &DiskLaunch,
    opts: LaunchOptions,
) -> Result<Vec<String>, DriverError> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));

    push(&[
        "-name",
        &format!("guest={},debug-threads=on", opt_value(&spec.name)),
    ]);
    // The VM id on the command line is what tells this VM's QEMU apart from a
    // recycled pid (see process::is_qemu_of); the guest sees it as its SMBIOS UUID.
    push(&["-uuid", &spec.id.to_string()]);
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    push(&["-machine", "q35"]);
    match opts.accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        // A 32 MiB translation cache instead of the default saves ~16 MiB per guest.
        Accel::Tcg => push(&["-accel", "tcg,tb-size=32"]),
    }
    push(&["-m", &format!("{}M", spec.memory_mib())]);
    push(&["-smp", &spec.vcpus.to_string()]);
    if opts.sandbox {
        // Not elevateprivileges=deny nor spawn=deny: both break -daemonize
        // (QEMU 10 exits 1 at start-up with either).
        push(&["-sandbox", "on,obsolete=deny,resourcecontrol=deny"]);
    }
    push(&["-msg", "timestamp=on"]);

    let run = |p: &Path, what: &str| utf8_path(spec, what, p).map(str::to_string);
    let pidfile = run(&paths.pidfile, "pidfile")?;
    let qemu_log = run(&paths.qemu_log, "QEMU log")?;
    let qmp = run(&paths.qmp_sock, "QMP socket")?;
    let qga = run(&paths.qga_sock, "guest agent socket")?;
    let console = run(&paths.console_sock, "console socket")?;

    push(&["-S", "-daemonize", "-pidfile", &pidfile]);
    // With -D, a daemonized QEMU keeps stderr (pointed at this log by the driver).
    push(&["-D", &qemu_log]);
    push(&[
        "-chardev",
        &socket_chardev("qmp0", &qmp),
        "-mon",
        "chardev=qmp0,mode=control",
    ]);
    push(&[
        "-chardev",
        &socket_chardev("console0", &console),
        "-serial",
        "chardev:console0",
    ]);
    push(&["-device", "virtio-serial-pci,id=vser0"]);
    push(&["-chardev", &socket_chardev("qga0", &qga)]);
    push(&[
        "-device",
        "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
    ]);

    // JSON -blockdev: no option-syntax escaping of the paths. Each layer's
    // backing node is named, so QEMU opens exactly the recorded chain.
    let mut below: Option<String> = None;
    if let Some((node, path, format)) = &disk.base {
        let base = json!({
            "driver": format,
            "node-name": node,
            "read-only": true,
            "file": { "driver": "file", "filename": run(path, "base image")? },
        });
        push(&["-blockdev", &base.to_string()]);
        below = Some(node.clone());
    }
    let mut top: Option<&str> = None;
    for layer in &disk.layers {
        let mut blockdev = json!({
            "driver": "qcow2",
            "node-name": layer.node,
            "discard": "unmap",
            "read-only": !layer.active,
            "file": { "driver": "file", "filename": run(&layer.path, "disk layer")? },
        });
        // No backing below the bottom layer of a restored disk: null keeps
        // QEMU from looking for one.
        blockdev["backing"] = match &below {
            Some(node) => json!(node),
            None => serde_json::Value::Null,
        };
        push(&["-blockdev", &blockdev.to_string()]);
        below = Some(layer.node.clone());
        top = Some(&layer.node);
    }
    let top = top.ok_or_else(|| DriverError::InvalidSpec {
        id: spec.id,
        reason: "the disk has no layer to open".into(),
    })?;
    push(&[
        "-device",
        &format!("virtio-blk-pci,drive={top},id=disk0-dev,bootindex=1"),
    ]);

    match &spec.nic {
        NicSpec::User => {
            push(&["-netdev", "user,id=net0"]);
            push(&[
                "-device",
                &format!(
                    "virtio-net-pci,netdev=net0,id=net0-dev,mac={}",
                    spec.mac_address()
                ),
            ]);
        }
    }

    // Hot-plug ports for volumes (see volume.rs), after every other device:
    // appended, they left the PCI addresses of the devices above unchanged.
    for port in 0..MAX_VOLUMES_PER_VM {
        push(&["-device", &hotplug_port(port)]);
    }

    match &spec.boot {
        BootSpec::Firmware => {}
        BootSpec::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            push(&["-kernel", utf8_path(spec, "kernel", kernel)?]);
            if let Some(initrd) = initrd {
                push(&["-initrd", utf8_path(spec, "initrd", initrd)?]);
            }
            push(&["-append", &kernel_cmdline(cmdline)]);
        }
    }
    Ok(a)
}

/// How the destination of a live migration starts (see [`make_incoming`]).
#[derive(Clone, Debug)]
pub(crate) struct Incoming {
    /// The disk is mirrored into this QEMU through an NBD export of its node
    /// while the migration runs.
    pub exported_disk: bool,
    /// The device ids of the volumes mirrored in the same way.
    pub exported_volumes: Vec<String>,
    /// Block nodes opened read-only at every other start that this one
    /// opens writable: the frozen snapshot layers the source copies into
    /// through their NBD exports before the memory moves.
    pub writable_nodes: Vec<String>,
}

/// Turns a VM's arguments into those of the destination of a live
/// migration: `-incoming defer` (the driver names the address later, with
/// `migrate-incoming`, once it has picked a port) and no `-S`, so QEMU runs
/// the guest the moment the migrated state is loaded instead of waiting for
/// a `cont` from the driver (which would add a round trip to the guest's
/// pause). With an exported disk, the disk device shares write access
/// (`share-rw=on`): the NBD export still holds the node writable when the
/// migration completes and QEMU activates the device, which would otherwise
/// refuse to start ("Permission conflict on node"); the source has stopped
/// writing through it by then (it drains and ends the mirror before the
/// switch-over). Nothing the guest sees changes: the state only loads into
/// the same devices.
pub(crate) fn make_incoming(args: &mut Vec<String>, incoming: &Incoming) {
    args.retain(|a| a != "-S");
    let exported = |a: &str| {
        (incoming.exported_disk && a.contains(",id=disk0-dev"))
            || incoming
                .exported_volumes
                .iter()
                .any(|d| a.contains(&format!(",id={},", opt_value(d))))
    };
    for a in args.iter_mut() {
        if a.starts_with("virtio-blk-pci,") && exported(a) {
            a.push_str(",share-rw=on");
        }
        if a.starts_with('{') && !incoming.writable_nodes.is_empty() {
            if let Ok(mut node) = serde_json::from_str::<serde_json::Value>(a) {
                let name = node.get("node-name").and_then(|n| n.as_str());
                if name.is_some_and(|n| incoming.writable_nodes.iter().any(|w| w == n)) {
                    node["read-only"] = json!(false);
                    *a = node.to_string();
                }
            }
        }
    }
    args.extend(["-incoming".to_string(), "defer".to_string()]);
}

/// The id of hot-plug port `port` (0-based): the bus a volume plugs into.
pub(crate) fn hotplug_port_id(port: usize) -> String {
    format!("hp{port}")
}

/// The `-device` value of hot-plug port `port`: a PCIe root port, alone in
/// its chassis so chassis and slot numbers never clash. q35's root bus takes
/// no hot-plugged devices itself; a root port does (QEMU signals it through
/// ACPI, which the guest kernel's built-in `acpiphp` handles).
fn hotplug_port(port: usize) -> String {
    format!(
        "pcie-root-port,id={},chassis={},slot=0",
        hotplug_port_id(port),
        port + 1
    )
}

/// A volume attached before the VM starts, as the command line needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VolumeDisk {
    /// Block node name (see `volume::node_name`).
    pub node: String,
    /// Device id (see `volume::device_id`).
    pub device: String,
    /// Hot-plug port, below [`MAX_VOLUMES_PER_VM`].
    pub port: usize,
    /// What the guest sees as the disk's serial.
    pub serial: String,
    /// The active layer (the volume's own file until a snapshot covers it).
    pub file: std::path::PathBuf,
    /// The node of the layer below the active one, for a volume with
    /// snapshot layers (their `-blockdev`s come first, see `volume.rs`);
    /// `None`: QEMU opens what the file's header names.
    pub backing: Option<String>,
}

/// The `-blockdev` (JSON, like disk0's) and `-device` of one volume.
pub(crate) fn volume_blockdev(v: &VolumeDisk) -> Result<serde_json::Value, DriverError> {
    let file = v.file.to_str().ok_or_else(|| {
        DriverError::Config(format!(
            "volume file path {} is not UTF-8",
            v.file.display()
        ))
    })?;
    let mut blockdev = json!({
        "driver": "qcow2",
        "node-name": v.node,
        "discard": "unmap",
        "file": { "driver": "file", "filename": file },
    });
    if let Some(backing) = &v.backing {
        blockdev["backing"] = json!(backing);
    }
    Ok(blockdev)
}

/// Arguments that add the VM's attached volumes, in attachment order, each
/// on its recorded port. Without `bootindex`: the VM boots from disk0 only.
pub(crate) fn volume_args(volumes: &[VolumeDisk]) -> Result<Vec<String>, DriverError> {
    let mut a = Vec::new();
    for v in volumes {
        if v.port >= MAX_VOLUMES_PER_VM {
            return Err(DriverError::Config(format!(
                "volume {} is recorded on hot-plug port {}, but a VM has only {MAX_VOLUMES_PER_VM}",
                v.device, v.port
            )));
        }
        a.push("-blockdev".to_string());
        a.push(volume_blockdev(v)?.to_string());
        a.push("-device".to_string());
        a.push(format!(
            "virtio-blk-pci,drive={},id={},bus={},serial={}",
            opt_value(&v.node),
            opt_value(&v.device),
            hotplug_port_id(v.port),
            opt_value(&v.serial)
        ));
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::tests::spec;

    fn disk(paths: &VmPaths) -> DiskLaunch {
        DiskLaunch {
            base: Some(("base0".into(), "/images/base.qcow2".into(), "qcow2".into())),
            layers: vec![
                DiskLayer {
                    node: "disk0".into(),
                    path: paths.overlay(),
                    active: false,
                },
                DiskLayer {
                    node: "layer-1".into(),
                    path: paths.disks().join("disk.1.qcow2"),
                    active: true,
                },
            ],
        }
    }

    fn has_pair(args: &[String], flag: &str, value: &str) -> bool {
        args.windows(2).any(|w| w[0] == flag && w[1] == value)
    }

    #[test]
    fn tcg_kernel_boot_command_line() {
        let mut s = spec();
        s.name = "a,b".into();
        s.boot = BootSpec::Kernel {
            kernel: "/g/vmlinuz".into(),
            initrd: Some("/g/initrd.img".into()),
            cmdline: "quiet".into(),
        };
        let paths = VmPaths::new(Path::new("/d/vms"), s.id);
        let args = qemu_args(
            &s,
            &paths,
            &disk(&paths),
            LaunchOptions {
                accel: Accel::Tcg,
                sandbox: true,
            },
        )
        .expect("args");
        assert!(has_pair(&args, "-accel", "tcg,tb-size=32"));
        assert!(has_pair(&args, "-m", "128M"));
        assert!(has_pair(&args, "-uuid", &s.id.to_string()));
        assert!(has_pair(&args, "-name", "guest=a,,b,debug-threads=on"));
        assert!(has_pair(&args, "-append", "quiet console=ttyS0"));
        assert!(has_pair(&args, "-initrd", "/g/initrd.img"));
        assert!(args.iter().any(|a| a == "-daemonize"));
        assert!(args.iter().any(|a| a == "-S"));
        assert!(
            args.iter().any(|a| a.starts_with("on,")),
            "sandbox: {args:?}"
        );
        assert!(args
            .iter()
            .any(|a| a.contains("name=org.qemu.guest_agent.0")));
        let blockdevs: Vec<serde_json::Value> = args
            .windows(2)
            .filter(|w| w[0] == "-blockdev")
            .map(|w| serde_json::from_str(&w[1]).expect("json"))
            .collect();
        assert_eq!(blockdevs.len(), 3, "base and two layers");
        assert_eq!(blockdevs[0]["node-name"], "base0");
        assert_eq!(blockdevs[0]["read-only"], true, "the base is never written");
        assert_eq!(blockdevs[1]["backing"], "base0");
        assert_eq!(blockdevs[1]["read-only"], true, "a frozen layer");
        assert_eq!(
            blockdevs[1]["file"]["filename"],
            paths.overlay().to_str().expect("utf8")
        );
        assert_eq!(blockdevs[2]["backing"], "disk0");
        assert_eq!(blockdevs[2]["read-only"], false);
        assert!(has_pair(
            &args,
            "-device",
            "virtio-blk-pci,drive=layer-1,id=disk0-dev,bootindex=1"
        ));
    }

    #[test]
    fn kvm_firmware_boot_without_sandbox() {
        let s = spec();
        let paths = VmPaths::new(Path::new("/d/vms"), s.id);
        let args = qemu_args(
            &s,
            &paths,
            &DiskLaunch {
                base: None,
                layers: vec![DiskLayer {
                    node: "disk0".into(),
                    path: paths.overlay(),
                    active: true,
                }],
            },
            LaunchOptions {
                accel: Accel::Kvm,
                sandbox: false,
            },
        )
        .expect("args");
        assert!(has_pair(&args, "-accel", "kvm"));
        assert!(has_pair(&args, "-cpu", "host"));
        assert!(!args.iter().any(|a| a == "-kernel" || a == "-sandbox"));
        let blockdev = args
            .windows(2)
            .find(|w| w[0] == "-blockdev")
            .map(|w| w[1].clone())
            .expect("blockdev");
        let v: serde_json::Value = serde_json::from_str(&blockdev).expect("json");
        assert_eq!(
            v["backing"],
            serde_json::Value::Null,
            "a standalone disk gets no backing"
        );
    }

    #[test]
    fn incoming_vm_has_the_same_devices_and_waits_for_the_state() {
        let s = spec();
        let paths = VmPaths::new(Path::new("/d/vms"), s.id);
        let opts = LaunchOptions {
            accel: Accel::Tcg,
            sandbox: false,
        };
        let normal = qemu_args(&s, &paths, &disk(&paths), opts).expect("args");
        let mut incoming = normal.clone();
        make_incoming(
            &mut incoming,
            &Incoming {
                exported_disk: false,
                exported_volumes: vec![],
                writable_nodes: vec![],
            },
        );
        assert!(has_pair(&incoming, "-incoming", "defer"));
        assert!(!incoming.iter().any(|a| a == "-S"));
        let devices = |args: &[String]| -> Vec<String> {
            args.windows(2)
                .filter(|w| w[0] == "-device" || w[0] == "-blockdev" || w[0] == "-machine")
                .map(|w| w[1].clone())
                .collect()
        };
        assert_eq!(devices(&normal), devices(&incoming));
        let volume = |n: usize| VolumeDisk {
            node: format!("vol-node-{n}"),
            device: format!("vol-{n}"),
            port: n,
            serial: format!("serial{n}"),
            file: PathBuf::from(format!("/d/volumes/{n}.qcow2")),
            backing: None,
        };
        let mut exported = normal.clone();
        exported.extend(volume_args(&[volume(1), volume(2)]).expect("volume args"));
        make_incoming(
            &mut exported,
            &Incoming {
                exported_disk: true,
                exported_volumes: vec!["vol-2".into()],
                writable_nodes: vec!["disk0".into()],
            },
        );
        assert!(has_pair(
            &exported,
            "-device",
            "virtio-blk-pci,drive=layer-1,id=disk0-dev,bootindex=1,share-rw=on"
        ));
        // The frozen layer named is opened writable (the source copies into
        // it); the active one was already.
        let blockdevs: Vec<serde_json::Value> = exported
            .windows(2)
            .filter(|w| w[0] == "-blockdev")
            .filter_map(|w| serde_json::from_str(&w[1]).ok())
            .collect();
        let read_only = |node: &str| {
            blockdevs
                .iter()
                .find(|b| b["node-name"] == node)
                .map(|b| b["read-only"] == true)
        };
        assert_eq!(read_only("disk0"), Some(false));
        assert_eq!(
            read_only("base0"),
            Some(true),
            "the base image stays read-only"
        );
        // Only the mirrored volume shares its node with the NBD export.
        assert!(has_pair(
            &exported,
            "-device",
            "virtio-blk-pci,drive=vol-node-1,id=vol-1,bus=hp1,serial=serial1"
        ));
        assert!(has_pair(
            &exported,
            "-device",
            "virtio-blk-pci,drive=vol-node-2,id=vol-2,bus=hp2,serial=serial2,share-rw=on"
        ));
    }

    #[test]
    fn every_vm_has_hotplug_ports_after_its_other_devices() {
        let s = spec();
        let paths = VmPaths::new(Path::new("/d/vms"), s.id);
        let opts = LaunchOptions {
            accel: Accel::Tcg,
            sandbox: false,
        };
        let args = qemu_args(&s, &paths, &disk(&paths), opts).expect("args");
        let devices: Vec<&String> = args
            .windows(2)
            .filter(|w| w[0] == "-device")
            .map(|w| &w[1])
            .collect();
        let ports: Vec<&&String> = devices
            .iter()
            .filter(|d| d.starts_with("pcie-root-port,"))
            .collect();
        assert_eq!(ports.len(), MAX_VOLUMES_PER_VM);
        assert_eq!(ports[0].as_str(), "pcie-root-port,id=hp0,chassis=1,slot=0");
        assert_eq!(ports[3].as_str(), "pcie-root-port,id=hp3,chassis=4,slot=0");
        // The ports come last, so the other devices keep their PCI addresses.
        let first_port = devices
            .iter()
            .position(|d| d.starts_with("pcie-root-port,"))
            .expect("a port");
        assert_eq!(first_port, devices.len() - MAX_VOLUMES_PER_VM);
        // The disk (its top layer here) is untouched and alone with a bootindex.
        assert!(has_pair(
            &args,
            "-device",
            "virtio-blk-pci,drive=layer-1,id=disk0-dev,bootindex=1"
        ));
    }

    #[test]
    fn volumes_plug_into_their_ports_in_attachment_order() {
        let vol = |port: usize, name: &str| VolumeDisk {
            node: format!("vol-{name}"),
            device: format!("vol-{name}-dev"),
            port,
            serial: format!("serial{name}"),
            file: format!("/d/volumes/{name}.qcow2").into(),
            backing: None,
        };
        let args = volume_args(&[vol(2, "b"), vol(0, "a")]).expect("args");
        assert_eq!(args.len(), 8);
        assert_eq!(args[0], "-blockdev");
        let b: serde_json::Value = serde_json::from_str(&args[1]).expect("json");
        assert_eq!(b["node-name"], "vol-b");
        assert_eq!(b["driver"], "qcow2");
        assert_eq!(b["file"]["filename"], "/d/volumes/b.qcow2");
        assert_eq!(
            args[3],
            "virtio-blk-pci,drive=vol-b,id=vol-b-dev,bus=hp2,serial=serialb"
        );
        assert_eq!(
            args[7],
            "virtio-blk-pci,drive=vol-a,id=vol-a-dev,bus=hp0,serial=seriala"
        );
        assert!(!args.iter().any(|a| a.contains("bootindex")));
        assert!(volume_args(&[]).expect("none").is_empty());
        let e = volume_args(&[vol(MAX_VOLUMES_PER_VM, "c")]).expect_err("no such port");
        assert!(e.to_string().contains("only 4"), "{e}");
    }

    #[test]
    fn console_is_added_only_when_missing() {
        assert_eq!(kernel_cmdline(""), "console=ttyS0");
        assert_eq!(kernel_cmdline("ro quiet"), "ro quiet console=ttyS0");
        assert_eq!(kernel_cmdline("console=hvc0 ro"), "console=hvc0 ro");
    }
}
