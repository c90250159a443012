//! Human output of inspection verbs (`--json` prints the daemon's data).
//! Every name, label and message is printed escaped ([`escape`]).

use crate::engine::{DeviceInfo, PoolInfo};
use crate::error::{Error, Result};
use crate::types::{Bytes, escape};
use serde_json::Value;
use std::collections::BTreeMap;

/// Fields `thinfs list -o` accepts.
pub const FIELDS: &[&str] = &[
    "name",
    "type",
    "state",
    "size",
    "used",
    "exclusive",
    "parent",
    "id",
    "created",
    "mounted",
    "labels",
    "error",
];

fn devices(v: Value) -> Result<Vec<DeviceInfo>> {
    serde_json::from_value(v).map_err(|e| Error::Corrupt(format!("device list: {e}")))
}

fn name_of(d: &DeviceInfo) -> String {
    escape(&d.full_name).into_owned()
}

/// A field of a device as printed: anything that comes from a user (names,
/// labels, error text) escaped, so a name cannot forge a line or send a
/// terminal escape.
fn field(d: &DeviceInfo, f: &str) -> String {
    escape(&raw_field(d, f)).into_owned()
}

fn raw_field(d: &DeviceInfo, f: &str) -> String {
    let r = &d.record;
    match f {
        "name" => d.full_name.clone(),
        "type" => match (r.kind, r.parent) {
            (crate::types::DeviceKind::Snapshot, _) => "snapshot".into(),
            (crate::types::DeviceKind::Containerd, _) => "containerd".into(),
            (_, Some(_)) => "clone".into(),
            _ => "image".into(),
        },
        "state" => format!("{:?}", r.state).to_lowercase(),
        "size" => r.size.human(),
        "used" => d
            .usage
            .map(|u| Bytes(u.mapped).approx())
            .unwrap_or_else(|| "-".into()),
        "exclusive" => d
            .usage
            .map(|u| Bytes(u.exclusive).approx())
            .unwrap_or_else(|| "-".into()),
        "parent" => d.parent_name.clone().unwrap_or_else(|| "-".into()),
        "id" => r.id.to_string(),
        "created" => r.created.to_string(),
        "mounted" => if d.mounted { "yes" } else { "no" }.into(),
        "labels" => {
            if r.labels.is_empty() {
                "-".into()
            } else {
                r.labels
                    .iter()
                    .map(|(k, v)| format!("{}={}", escape(k), escape(v)))
                    .collect::<Vec<_>>()
                    .join(",")
            }
        }
        "error" => r.error.clone().unwrap_or_else(|| "-".into()),
        _ => String::new(),
    }
}

/// `thinfs list`.
pub fn list(v: Value, fields: &[String], header: bool) -> Result<String> {
    list_with(v, fields, header, Vec::new())
}

/// [`list`] with `extra` rows (cells of `fields`) after the devices.
pub fn list_with(
    v: Value,
    fields: &[String],
    header: bool,
    extra: Vec<Vec<String>>,
) -> Result<String> {
    for f in fields {
        if !FIELDS.contains(&f.as_str()) {
            return Err(Error::Invalid(format!(
                "unknown field {f:?} (fields: {})",
                FIELDS.join(",")
            )));
        }
    }
    let mut rows: Vec<Vec<String>> = devices(v)?
        .iter()
        .map(|d| fields.iter().map(|f| field(d, f)).collect())
        .collect();
    rows.extend(extra);
    let mut widths: Vec<usize> = fields
        .iter()
        .map(|f| if header { f.len() } else { 0 })
        .collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: &[String], out: &mut String| {
        let l: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(l.join("  ").trim_end());
        out.push('\n');
    };
    if header {
        line(
            &fields.iter().map(|f| f.to_uppercase()).collect::<Vec<_>>(),
            &mut out,
        );
    }
    for r in &rows {
        line(r, &mut out);
    }
    Ok(out)
}

/// `thinfs tree` (text or Graphviz).
pub fn tree(v: Value, dot: bool) -> Result<String> {
    let devs = devices(v)?;
    let mut kids: BTreeMap<Option<u32>, Vec<&DeviceInfo>> = BTreeMap::new();
    for d in &devs {
        kids.entry(d.record.parent.map(|p| p.get()))
            .or_default()
            .push(d);
    }
    for v in kids.values_mut() {
        v.sort_by_key(|d| {
            (
                d.record.kind == crate::types::DeviceKind::Image,
                d.record.seq,
            )
        });
    }
    if dot {
        let mut out = String::from("digraph thinfs {\n  rankdir=LR;\n");
        for d in &devs {
            let shape = if d.record.kind == crate::types::DeviceKind::Snapshot {
                "ellipse"
            } else {
                "box"
            };
            let label = name_of(d).replace('\\', "\\\\").replace('"', "\\\"");
            out.push_str(&format!(
                "  d{} [label=\"{label}\", shape={shape}];\n",
                d.record.id
            ));
        }
        for d in &devs {
            if let Some(p) = d.record.parent {
                out.push_str(&format!("  d{p} -> d{};\n", d.record.id));
            }
        }
        out.push_str("}\n");
        return Ok(out);
    }
    // An explicit stack, not recursion: a clone chain can be thousands deep.
    let mut out = String::new();
    let mut roots: Vec<&DeviceInfo> = kids.get(&None).into_iter().flatten().copied().collect();
    roots.sort_by(|a, b| b.full_name.cmp(&a.full_name));
    let mut stack: Vec<(&DeviceInfo, usize)> = roots.into_iter().map(|r| (r, 0)).collect();
    let mut seen = std::collections::HashSet::new();
    while let Some((d, depth)) = stack.pop() {
        if !seen.insert(d.record.id) {
            continue;
        }
        out.push_str(&DeviceInfo::tree_line(
            depth,
            &name_of(d),
            &field(d, "type"),
        ));
        for k in kids
            .get(&Some(d.record.id.get()))
            .into_iter()
            .flatten()
            .rev()
        {
            stack.push((k, depth + 1));
        }
    }
    Ok(out)
}

/// `thinfs list`'s rows of partial receives (`receive -s`), in the same
/// columns: NAME (a full stream: the image is partially received) or
/// NAME@SNAP (incremental), state `partial`, used = bytes received.
pub fn partial_rows(partials: &Value, kind: &str, fields: &[String]) -> Vec<Vec<String>> {
    let Ok(ps) = serde_json::from_value::<Vec<crate::engine::PartialInfo>>(partials.clone()) else {
        return Vec::new();
    };
    ps.iter()
        .filter_map(|p| {
            let ty = if p.base.is_some() {
                "snapshot"
            } else {
                "image"
            };
            if kind != "all" && kind != ty {
                return None;
            }
            Some(
                fields
                    .iter()
                    .map(|f| match f.as_str() {
                        "name" if p.base.is_some() => {
                            escape(&format!("{}@{}", p.name, p.snapshot)).into_owned()
                        }
                        "name" => escape(&p.name).into_owned(),
                        "type" => ty.into(),
                        "state" => "partial".into(),
                        "size" => Bytes(p.size).human(),
                        "used" => Bytes(p.received).approx(),
                        "created" => p.created.to_string(),
                        "mounted" => "no".into(),
                        _ => "-".into(),
                    })
                    .collect(),
            )
        })
        .collect()
}

/// `thinfs info NAME`: the device (with `receive_resume_token` when NAME
/// has a partial receive), or the partial receive alone when NAME is an
/// image that a full stream is still filling.
pub fn with_partial(info: Result<Value>, partials: &Value, target: &str) -> Result<Value> {
    let p = partials
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"].as_str() == Some(target)))
        .cloned();
    match (info, p) {
        (Ok(mut v), Some(p)) => {
            v["receive_resume_token"] = p["receive_resume_token"].clone();
            v["partial_receive"] = p;
            Ok(v)
        }
        (Ok(v), None) => Ok(v),
        (Err(_), Some(mut p)) => {
            p["state"] = "partial".into();
            Ok(p)
        }
        (Err(e), None) => Err(e),
    }
}

/// `thinfs info`.
pub fn info(v: Value) -> Result<String> {
    if v["state"].as_str() == Some("partial") {
        let p: crate::engine::PartialInfo =
            serde_json::from_value(v).map_err(|e| Error::Corrupt(format!("info: {e}")))?;
        return Ok(format!(
            "name       {}\nstate      partial (receive -s: {} of {} received of @{}, identity {})\ntoken      {}\n",
            escape(&p.name),
            Bytes(p.received).approx(),
            Bytes(p.size).human(),
            escape(&p.snapshot),
            p.identity,
            p.receive_resume_token
        ));
    }
    let token = v["receive_resume_token"].as_str().map(str::to_string);
    let d: DeviceInfo =
        serde_json::from_value(v).map_err(|e| Error::Corrupt(format!("info: {e}")))?;
    let mut out = String::new();
    for f in [
        "name",
        "type",
        "id",
        "state",
        "error",
        "size",
        "used",
        "exclusive",
        "parent",
        "created",
        "mounted",
        "labels",
    ] {
        out.push_str(&format!("{f:<10} {}\n", field(&d, f)));
    }
    out.push_str(&format!(
        "{:<10} {}\n",
        "children",
        if d.children.is_empty() {
            "-".into()
        } else {
            d.children
                .iter()
                .map(|c| escape(c))
                .collect::<Vec<_>>()
                .join(", ")
        }
    ));
    if let Some(c) = &d.record.containerd {
        let kind = serde_json::to_value(c.kind).unwrap_or_default();
        out.push_str(&format!("{:<10} {}\n", "ctd-key", escape(&c.key)));
        out.push_str(&format!(
            "{:<10} {}\n",
            "ctd-kind",
            kind.as_str().unwrap_or("?")
        ));
    }
    if let Some(t) = token {
        out.push_str(&format!(
            "{:<10} partial receive kept (receive -s); token {t}\n",
            "receive"
        ));
    }
    Ok(out)
}

/// `thinfs usage`.
pub fn usage(v: Value) -> Result<String> {
    let devs = devices(v)?;
    let mut out = list(
        serde_json::to_value(&devs).map_err(|e| Error::Corrupt(e.to_string()))?,
        &["name".into(), "exclusive".into(), "used".into()],
        true,
    )?;
    let (ex, mapped) = devs
        .iter()
        .filter_map(|d| d.usage)
        .fold((0, 0), |(a, b), u| (a + u.exclusive, b + u.mapped));
    out.push_str(&format!(
        "total: {} exclusive, {} mapped ({} shared between devices)\n",
        Bytes(ex).approx(),
        Bytes(mapped).approx(),
        Bytes(mapped.saturating_sub(ex)).approx()
    ));
    Ok(out)
}

/// `thinfs pool`.
pub fn pool(v: Value) -> Result<String> {
    let p: PoolInfo =
        serde_json::from_value(v).map_err(|e| Error::Corrupt(format!("pool: {e}")))?;
    Ok(format!(
        "backend         {}\nlayout          {}\nstate           {}\ndata used       {} of {} ({} free, {} %)\novercommit      {} in images = {:.2}x the pool\nwriters budget  {} across {} writable mounted image(s)\nreserve         {}\ndevices         {}\ntransaction id  {}\n",
        p.status.backend,
        escape(&p.status.detail),
        p.space.state,
        Bytes(p.status.used).approx(),
        Bytes(p.status.total),
        Bytes(p.status.available).approx(),
        p.space.used_percent,
        Bytes(p.space.virtual_size).approx(),
        p.space.overcommit,
        Bytes(p.space.writers_budget).approx(),
        p.space.writable_mounted,
        Bytes(p.reserve),
        p.devices,
        p.transaction_id
    ))
}
