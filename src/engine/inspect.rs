//! Read-only views: info, tree, usage, pool.

use super::Engine;
use crate::backend::{PoolStatus, Usage};
use crate::error::Result;
use crate::meta::{DeviceKind, DeviceRecord};
use serde::{Deserialize, Serialize};

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

impl Engine {
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

    /// The graph as an indented text tree (roots are images without parent).
    pub fn tree_text(&self) -> Result<String> {
        let all = self.meta.list()?;
        let mut out = String::new();
        let mut roots: Vec<_> = all.iter().filter(|r| r.parent.is_none()).collect();
        roots.sort_by(|a, b| a.name.cmp(&b.name));
        for r in roots {
            self.tree_node(r, 0, &mut out)?;
        }
        Ok(out)
    }

    fn tree_node(&self, r: &DeviceRecord, depth: usize, out: &mut String) -> Result<()> {
        let tag = match r.kind {
            DeviceKind::Image if r.parent.is_some() => "clone",
            DeviceKind::Image => "image",
            DeviceKind::Snapshot => "snapshot",
        };
        out.push_str(&format!(
            "{}{} ({tag}, id {}, {:?})\n",
            "  ".repeat(depth),
            self.full_name(r),
            r.id,
            r.state
        ));
        let mut kids: Vec<_> = self
            .meta
            .children(r.id)?
            .into_iter()
            .filter_map(|c| self.meta.get(c).ok().flatten())
            .collect();
        kids.sort_by_key(|k| (k.kind == DeviceKind::Image, k.seq));
        for k in kids {
            self.tree_node(&k, depth + 1, out)?;
        }
        Ok(())
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
