//! Read-only views: info, tree, usage, pool.

use super::{Engine, Target};
use crate::backend::{PoolStatus, Usage};
use crate::error::{Error, Result};
use crate::meta::{DeviceKind, DeviceRecord};
use crate::types::{MAX_SHOWN, cut, escape};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// Everything known about one device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Full name: `image` or `image@snap`.
    pub full_name: String,
    /// The record.
    #[serde(flatten)]
    pub record: DeviceRecord,
    /// Full name of the parent.
    pub parent_name: Option<String>,
    /// Full names of the children.
    pub children: Vec<String>,
    /// Space used, if the backend could tell.
    pub usage: Option<Usage>,
    /// Mounted underneath right now.
    pub mounted: bool,
}

/// Pool status plus counts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolInfo {
    /// Backend status.
    #[serde(flatten)]
    pub status: PoolStatus,
    /// Reserve in bytes.
    pub reserve: u64,
    /// Number of devices.
    pub devices: usize,
    /// Pool transaction id.
    pub transaction_id: u64,
    /// State (ok/low/full) and overcommit.
    #[serde(flatten)]
    pub space: super::space::SpaceView,
}

/// Indentation shown at most in a text tree; deeper lines say their depth.
pub const MAX_INDENT: usize = 64;

impl DeviceInfo {
    /// One line of a text tree (`.thinfs/tree`, `thinfs tree`): two spaces
    /// per level up to [`MAX_INDENT`] levels, then `[depth N] ` (a deep
    /// chain would otherwise cost a quadratic amount of spaces).
    pub fn tree_line(depth: usize, name: &str, tag: &str) -> String {
        if depth <= MAX_INDENT {
            format!("{}{name} ({tag})\n", "  ".repeat(depth))
        } else {
            format!(
                "{}[depth {depth}] {name} ({tag})\n",
                "  ".repeat(MAX_INDENT)
            )
        }
    }
}

impl Engine {
    /// What `thinfs info` shows for `t`: an image or snapshot, or
    /// containerd's device `ctd-N` of any kind (inspection only: the
    /// changing verbs resolve with [`Engine::resolve`], which never
    /// reaches containerd's devices).
    pub fn resolve_info(&self, t: &Target) -> Result<DeviceRecord> {
        match self.resolve(t) {
            Err(Error::NotFound(why)) if t.snap.is_none() => match self.layer_id(&t.image) {
                Ok(id) => self.record(id),
                Err(_) => Err(Error::NotFound(why)),
            },
            r => r,
        }
    }

    /// `image` or `image@snap` for a record.
    pub fn full_name(&self, r: &DeviceRecord) -> String {
        match (r.kind, r.parent) {
            (DeviceKind::Snapshot, Some(p)) => match self.meta.get(p) {
                Ok(Some(img)) => format!("{}@{}", img.name, r.name),
                _ => format!("?@{}", r.name),
            },
            _ => r.name.to_string(),
        }
    }

    /// Info on one device; `with_usage` walks its extents (can be slow).
    pub fn info(&self, r: &DeviceRecord, with_usage: bool) -> Result<DeviceInfo> {
        let parent_name = match r.parent {
            Some(p) => self.meta.get(p)?.map(|pr| self.full_name(&pr)),
            None => None,
        };
        let mut children = Vec::new();
        for c in self.meta.children(r.id)? {
            if let Some(cr) = self.meta.get(c)? {
                children.push(self.full_name(&cr));
            }
        }
        let usage = if with_usage {
            self.backend.usage(r.dev).ok()
        } else {
            None
        };
        Ok(DeviceInfo {
            full_name: self.full_name(r),
            record: r.clone(),
            parent_name,
            children,
            usage,
            mounted: self.mounted(r.id).is_some(),
        })
    }

    /// Info on every device.
    pub fn list_info(&self, with_usage: bool) -> Result<Vec<DeviceInfo>> {
        let mut v = Vec::new();
        for r in self.meta.list()? {
            v.push(self.info(&r, with_usage)?);
        }
        v.sort_by(|a, b| a.full_name.cmp(&b.full_name));
        Ok(v)
    }

    /// `image` or `image@snap` for a log line: escaped and cut, so that no
    /// name can forge a log line or make it long.
    pub fn log_name(&self, r: &DeviceRecord) -> String {
        escape(&cut(&self.full_name(r), MAX_SHOWN)).into_owned()
    }

    /// The graph as an indented text tree (roots are images without parent),
    /// names escaped. Walked with an explicit stack, not recursion: a clone
    /// chain can be thousands of levels deep.
    pub fn tree_text(&self) -> Result<String> {
        let all = self.meta.list()?;
        let mut out = String::new();
        let mut roots: Vec<_> = all.iter().filter(|r| r.parent.is_none()).cloned().collect();
        roots.sort_by(|a, b| b.name.cmp(&a.name));
        let mut stack: Vec<(DeviceRecord, usize)> = roots.into_iter().map(|r| (r, 0)).collect();
        let mut seen = HashSet::new();
        while let Some((r, depth)) = stack.pop() {
            if !seen.insert(r.id) {
                continue;
            }
            let tag = match r.kind {
                DeviceKind::Image if r.parent.is_some() => "clone",
                DeviceKind::Image => "image",
                DeviceKind::Snapshot => "snapshot",
                DeviceKind::Containerd => "containerd",
            };
            let tag = format!("{tag}, id {}, {:?}", r.id, r.state);
            out.push_str(&DeviceInfo::tree_line(
                depth,
                &escape(&self.full_name(&r)),
                &tag,
            ));
            let mut kids: Vec<_> = self
                .meta
                .children(r.id)?
                .into_iter()
                .filter_map(|c| self.meta.get(c).ok().flatten())
                .collect();
            kids.sort_by_key(|k| (k.kind == DeviceKind::Image, k.seq));
            stack.extend(kids.into_iter().rev().map(|k| (k, depth + 1)));
        }
        Ok(out)
    }

    /// The pool's transaction id: every committed change of the metadata
    /// raises it, so a view made when it had this value shows every change
    /// that completed before (cheap: one record read).
    pub fn transaction_id(&self) -> Result<u64> {
        Ok(self.meta.pool()?.map(|p| p.transaction_id).unwrap_or(0))
    }

    /// Pool status.
    pub fn pool_info(&self) -> Result<PoolInfo> {
        Ok(PoolInfo {
            status: self.backend.status()?,
            reserve: self.config.reserve.0,
            devices: self.meta.list()?.len(),
            transaction_id: self.meta.pool()?.map(|p| p.transaction_id).unwrap_or(0),
            space: self.space_view()?,
        })
    }
}
