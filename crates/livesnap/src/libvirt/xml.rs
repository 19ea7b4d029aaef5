//! The few pieces of libvirt's XML livesnap reads and writes: the disks of
//! a domain's live definition (target, source, format, backing chain, a
//! running copy), and the backup and block-copy documents it hands back.

use roxmltree::{Document, Node};

/// A backing image of a disk, as the live XML's `<backingStore>` names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingStore {
    /// Its file (or device).
    pub source: String,
    /// Its format, if libvirt knows it.
    pub format: Option<String>,
}

/// One `<disk device='disk'>` of the domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskDef {
    /// `<target dev=...>`: `vda`.
    pub target: String,
    /// `type`: `file`, `block`, `network`...
    pub kind: String,
    /// The file or device path (`None` for network disks).
    pub source: Option<String>,
    /// `<driver type=...>`: `raw`, `qcow2`.
    pub format: Option<String>,
    /// The first backing image, if any.
    pub backing: Option<BackingStore>,
    /// `<readonly/>`.
    pub read_only: bool,
    /// A `<mirror>` is attached (a block copy runs on it).
    pub mirror: bool,
    /// That copy is READY (`<mirror ready='yes'>`).
    pub mirror_ready: bool,
}

fn source_of(n: Node) -> Option<String> {
    let s = n.children().find(|c| c.has_tag_name("source"))?;
    s.attribute("file")
        .or(s.attribute("dev"))
        .or(s.attribute("name"))
        .or(s.attribute("volume"))
        .map(str::to_string)
}

fn format_of(n: Node, element: &str) -> Option<String> {
    n.children()
        .find(|c| c.has_tag_name(element))
        .and_then(|d| d.attribute("type"))
        .map(str::to_string)
}

/// The disks (not cdroms or floppies) of a domain's XML.
pub fn disks(domain_xml: &str) -> Result<Vec<DiskDef>, String> {
    let doc = Document::parse(domain_xml).map_err(|e| format!("bad domain XML: {e}"))?;
    let Some(devices) = doc
        .root_element()
        .children()
        .find(|c| c.has_tag_name("devices"))
    else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for d in devices.children().filter(|c| c.has_tag_name("disk")) {
        if d.attribute("device").unwrap_or("disk") != "disk" {
            continue;
        }
        let Some(target) = d
            .children()
            .find(|c| c.has_tag_name("target"))
            .and_then(|t| t.attribute("dev"))
        else {
            continue;
        };
        // An empty <backingStore/> ends the chain: no backing image.
        let backing = d
            .children()
            .find(|c| c.has_tag_name("backingStore"))
            .and_then(|b| {
                Some(BackingStore {
                    source: source_of(b)?,
                    format: format_of(b, "format"),
                })
            });
        out.push(DiskDef {
            target: target.to_string(),
            kind: d.attribute("type").unwrap_or("file").to_string(),
            source: source_of(d),
            format: format_of(d, "driver"),
            backing,
            read_only: d.children().any(|c| c.has_tag_name("readonly")),
            mirror: d.children().any(|c| c.has_tag_name("mirror")),
            mirror_ready: d
                .children()
                .any(|c| c.has_tag_name("mirror") && c.attribute("ready") == Some("yes")),
        });
    }
    Ok(out)
}

/// Finds DISK by its target name (`vda`) or its source path.
pub fn find<'a>(disks: &'a [DiskDef], name: &str) -> Option<&'a DiskDef> {
    disks
        .iter()
        .find(|d| d.target == name)
        .or_else(|| disks.iter().find(|d| d.source.as_deref() == Some(name)))
}

/// Escapes text for an XML attribute value.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// A push-mode `<domainbackup>` of disk `disk` only, into a new `format`
/// file at `path` (every other disk is listed with `backup='no'`:
/// libvirt backs up all disks it is not told to skip); with `incremental`,
/// only what changed since that checkpoint.
pub fn push_backup(
    all: &[DiskDef],
    disk: &str,
    path: &str,
    format: &str,
    incremental: Option<&str>,
) -> String {
    let mut s = String::from("<domainbackup mode='push'>\n");
    if let Some(cp) = incremental {
        s += &format!("  <incremental>{}</incremental>\n", escape(cp));
    }
    s += "  <disks>\n";
    for d in all {
        if d.target == disk {
            s += &format!(
                "    <disk name='{}' backup='yes' type='file'>\n      <target file='{}'/>\n      <driver type='{}'/>\n    </disk>\n",
                escape(&d.target),
                escape(path),
                escape(format)
            );
        } else {
            s += &format!("    <disk name='{}' backup='no'/>\n", escape(&d.target));
        }
    }
    s + "  </disks>\n</domainbackup>\n"
}

/// A `<domaincheckpoint>` named `name` tracking disk `disk` only with a
/// bitmap (libvirt names the bitmap after the checkpoint).
pub fn checkpoint(all: &[DiskDef], disk: &str, name: &str, description: &str) -> String {
    let mut s = format!(
        "<domaincheckpoint>\n  <name>{}</name>\n  <description>{}</description>\n  <disks>\n",
        escape(name),
        escape(description)
    );
    for d in all {
        let how = if d.target == disk { "bitmap" } else { "no" };
        s += &format!(
            "    <disk name='{}' checkpoint='{how}'/>\n",
            escape(&d.target)
        );
    }
    s + "  </disks>\n</domaincheckpoint>\n"
}

/// The destination of a block copy: a `format` file at `path`.
pub fn copy_destination(path: &str, format: &str) -> String {
    format!(
        "<disk type='file'>\n  <source file='{}'/>\n  <driver type='{}'/>\n</disk>\n",
        escape(path),
        escape(format)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = r#"<domain type='qemu' id='3'>
  <name>vm1</name>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/img/top.qcow2' index='2'/>
      <backingStore type='file' index='1'>
        <format type='raw'/>
        <source file='/img/base.raw'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <mirror type='file' job='copy' ready='yes'>
        <format type='qcow2'/>
        <source file='/backup/copy.qcow2'/>
      </mirror>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg/data'/>
      <backingStore/>
      <target dev='vdb' bus='virtio'/>
      <readonly/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='sda' bus='sata'/>
    </disk>
  </devices>
</domain>"#;

    #[test]
    fn reads_disks_backing_and_mirror() {
        let d = disks(DOMAIN).unwrap();
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!(d[0].target, "vda");
        assert_eq!(d[0].source.as_deref(), Some("/img/top.qcow2"));
        assert_eq!(d[0].format.as_deref(), Some("qcow2"));
        assert_eq!(
            d[0].backing,
            Some(BackingStore {
                source: "/img/base.raw".into(),
                format: Some("raw".into())
            })
        );
        assert!(d[0].mirror && d[0].mirror_ready && !d[0].read_only);
        assert_eq!(d[1].kind, "block");
        assert_eq!(d[1].source.as_deref(), Some("/dev/vg/data"));
        assert!(d[1].backing.is_none() && d[1].read_only && !d[1].mirror);
        assert_eq!(find(&d, "/dev/vg/data").unwrap().target, "vdb");
        assert_eq!(find(&d, "vda").unwrap().target, "vda");
        assert!(find(&d, "sda").is_none());
    }

    #[test]
    fn backup_lists_other_disks_as_skipped_and_escapes() {
        let d = disks(DOMAIN).unwrap();
        let x = push_backup(&d, "vdb", "/b/it's<1>.raw", "raw", None);
        assert!(x.contains("<disk name='vda' backup='no'/>"), "{x}");
        assert!(
            x.contains("<target file='/b/it&apos;s&lt;1&gt;.raw'/>"),
            "{x}"
        );
        // What we write parses back.
        Document::parse(&x).unwrap();
        Document::parse(&copy_destination("/a&b", "qcow2")).unwrap();
        let x = push_backup(&d, "vda", "/b/1.qcow2", "qcow2", Some("cp<0>"));
        assert!(x.contains("<incremental>cp&lt;0&gt;</incremental>"), "{x}");
        Document::parse(&x).unwrap();
        let c = checkpoint(&d, "vda", "cp1", "chain c");
        assert!(c.contains("<disk name='vda' checkpoint='bitmap'/>"), "{c}");
        assert!(c.contains("<disk name='vdb' checkpoint='no'/>"), "{c}");
        Document::parse(&c).unwrap();
    }
}
