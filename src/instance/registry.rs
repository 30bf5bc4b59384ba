//! Named instances: start under a name, find by name, stop all.
//!
//! A registry is an ordinary value (not a process-global), so tests and
//! programs can hold as many as they like.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::{Instance, InstanceOptions};
use crate::error::{Error, Result};

/// A set of instances by name. Cloning shares the same set.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    /// `None` marks a name reserved by a start still in progress, so two
    /// concurrent starts under one name cannot both succeed.
    instances: Arc<Mutex<BTreeMap<String, Option<Instance>>>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Option<Instance>>> {
        self.instances.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts an instance under `name`; refuses a name already taken.
    pub async fn start(&self, name: &str, options: InstanceOptions) -> Result<Instance> {
        {
            let mut instances = self.lock();
            if instances.contains_key(name) {
                return Err(Error::Registry(format!("an instance named {name:?} is already registered")));
            }
            instances.insert(name.to_owned(), None);
        }
        match Instance::start(options.name(name)).await {
            Ok(instance) => {
                self.lock().insert(name.to_owned(), Some(instance.clone()));
                Ok(instance)
            }
            Err(e) => {
                self.lock().remove(name);
                Err(e)
            }
        }
    }

    /// The instance registered under `name`.
    pub fn get(&self, name: &str) -> Option<Instance> {
        self.lock().get(name).cloned().flatten()
    }

    /// The names of the registered (fully started) instances, sorted.
    pub fn names(&self) -> Vec<String> {
        self.lock().iter().filter(|(_, i)| i.is_some()).map(|(n, _)| n.clone()).collect()
    }

    /// Stops the instance under `name` and forgets it.
    pub async fn stop(&self, name: &str) -> Result<()> {
        let instance = match self.lock().get(name) {
            Some(Some(instance)) => instance.clone(),
            _ => return Err(Error::Registry(format!("no instance named {name:?}"))),
        };
        let result = instance.stop().await;
        self.lock().remove(name);
        result
    }

    /// Stops every instance (in parallel) and forgets them; returns the first
    /// error, after trying them all.
    pub async fn stop_all(&self) -> Result<()> {
        let instances: Vec<(String, Instance)> =
            std::mem::take(&mut *self.lock()).into_iter().filter_map(|(n, i)| i.map(|i| (n, i))).collect();
        let stops = instances.iter().map(|(_, i)| i.stop());
        let mut first_error = None;
        for result in futures_util::future::join_all(stops).await {
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
