//! The pure part of the apply ([`Batch`], [`columns`]) against an oracle:
//! random remote transactions (inserts, updates with and without unchanged
//! TOAST columns or a key change, deletes, truncates, column adds, drops and
//! renames, big groups that become COPY) are turned into statements, run on
//! a real embedded instance, and the table compared with an in-memory model
//! that applies the same changes row by row.

use std::sync::Arc;

use bytes::Bytes;

use super::batch::Batch;
use super::columns::{self, NewColumn};
use crate::replication::ChangeOp;
use crate::replication::pgoutput::{OldTuple, Value};
use crate::replication::statements::{LocalColumn, RelationState, run_steps};
use crate::{Instance, InstanceOptions};

/// A deterministic generator (splitmix64): a failing seed replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

const TEXTS: &[&str] =
    &["", "plain", "it's", "back\\slash", "tab\there", "new\nline", "NULL", "{a,b}", "\"q\"", "日本 ✓"];

/// The model of one remote table: column names (the first, `id`, is the
/// key unless the table has FULL identity) and rows of text values.
/// What a run exercised (so that a change of the generator that stops
/// covering a path fails the test).
#[derive(Default, Debug)]
struct Covered {
    copies: usize,
    key_changes: usize,
    unchanged_toast: usize,
    schema_changes: usize,
    ambiguous: usize,
    truncates: usize,
    /// Inserts and updates of the table grouped apart (`batch::beside`).
    reordered: u64,
}

struct Model {
    covered: Covered,
    columns: Vec<String>,
    /// Remote attribute numbers of the columns.
    attnums: Vec<i16>,
    max_attnum: i16,
    rows: Vec<Vec<Option<String>>>,
    next_column: usize,
}

fn text(v: &Option<String>) -> Value {
    match v {
        Some(s) => Value::Text(Bytes::copy_from_slice(s.as_bytes())),
        None => Value::Null,
    }
}

fn state(columns: &[LocalColumn], full: bool) -> Arc<RelationState> {
    Arc::new(RelationState {
        schema: "public".into(),
        name: "t".into(),
        qualified: "\"public\".\"t\"".into(),
        columns: columns.to_vec(),
        key: if full { (0..columns.len()).collect() } else { vec![0] },
        full_identity: full,
        column_names: columns.iter().map(|c| c.name.clone()).collect(),
        enum_columns: vec![],
        // The test table's only unique index is its primary key.
        reorder: !full,
    })
}

fn random_value(rng: &mut Rng) -> Option<String> {
    match rng.below(4) {
        0 => None,
        1 => Some(rng.below(1000).to_string()),
        _ => Some(TEXTS[rng.below(TEXTS.len())].to_owned()),
    }
}

/// One random remote transaction, fed to `batch` and applied to `model`.
fn random_transaction(
    rng: &mut Rng,
    model: &mut Model,
    rel: &mut Arc<RelationState>,
    batch: &mut Batch,
    next_id: &mut u64,
) {
    let full = rel.full_identity;
    for _ in 0..1 + rng.below(12) {
        let width = model.columns.len();
        let roll = rng.below(100);
        if roll < 35 || model.rows.is_empty() {
            // Inserts; now and then enough of them for a COPY.
            let n = if rng.chance(3) { 600 } else { 1 };
            model.covered.copies += usize::from(n == 600);
            for _ in 0..n {
                *next_id += 1;
                let mut row = vec![Some(next_id.to_string())];
                row.extend((1..width).map(|_| random_value(rng)));
                batch.change(1, rel, ChangeOp::Insert, None, Some(row.iter().map(text).collect())).unwrap();
                model.rows.push(row);
            }
        } else if roll < 65 {
            let i = rng.below(model.rows.len());
            let old = model.rows[i].clone();
            let mut new = old.clone();
            let mut tuple: Vec<Value> = Vec::new();
            let change_key = !full && rng.chance(15);
            if change_key {
                model.covered.key_changes += 1;
                *next_id += 1;
                new[0] = Some(next_id.to_string());
            }
            for (j, cell) in new.iter_mut().enumerate() {
                if j > 0 && rng.chance(50) {
                    *cell = random_value(rng);
                }
            }
            for (j, cell) in new.iter().enumerate() {
                // An unchanged TOAST value is not sent (never with FULL identity).
                if !full && j > 0 && cell == &old[j] && rng.chance(30) {
                    model.covered.unchanged_toast += 1;
                    tuple.push(Value::Unchanged);
                } else {
                    tuple.push(text(cell));
                }
            }
            let old_tuple = if full {
                Some(OldTuple::Full(old.iter().map(text).collect()))
            } else if change_key {
                Some(OldTuple::Key(
                    old.iter().enumerate().map(|(j, v)| if j == 0 { text(v) } else { Value::Null }).collect(),
                ))
            } else {
                None
            };
            batch.change(1, rel, ChangeOp::Update, old_tuple, Some(tuple)).unwrap();
            model.rows[i] = new;
        } else if roll < 85 {
            let i = rng.below(model.rows.len());
            let old = model.rows.remove(i);
            let old_tuple = if full {
                OldTuple::Full(old.iter().map(text).collect())
            } else {
                OldTuple::Key(old.iter().enumerate().map(|(j, v)| if j == 0 { text(v) } else { Value::Null }).collect())
            };
            batch.change(1, rel, ChangeOp::Delete, Some(old_tuple), None).unwrap();
        } else if roll < 88 {
            batch.statement("TRUNCATE \"public\".\"t\"".into(), vec![]);
            model.rows.clear();
            model.covered.truncates += 1;
        } else {
            schema_change(rng, model, rel, batch);
        }
    }
}

/// Adds, drops or renames a column upstream; the new Relation message goes
/// through [`columns::plan`] like the apply's.
fn schema_change(rng: &mut Rng, model: &mut Model, rel: &mut Arc<RelationState>, batch: &mut Batch) {
    let before = (model.columns.clone(), model.attnums.clone(), model.rows.clone());
    let width = model.columns.len();
    match rng.below(3) {
        0 => {
            model.next_column += 1;
            model.columns.push(format!("c{}", model.next_column));
            let attnum = model.max_attnum + 1;
            model.max_attnum = attnum;
            model.attnums.push(attnum);
            for row in &mut model.rows {
                row.push(None);
            }
        }
        1 if width > 2 => {
            let j = 1 + rng.below(width - 1);
            model.columns.remove(j);
            model.attnums.remove(j);
            for row in &mut model.rows {
                row.remove(j);
            }
        }
        _ if width > 1 => {
            let j = 1 + rng.below(width - 1);
            model.next_column += 1;
            model.columns[j] = format!("c{}", model.next_column);
        }
        _ => return,
    }
    // The catalog gives attribute numbers only when it still describes the
    // message: half of the time here.
    let known = rng.chance(50);
    let new: Vec<NewColumn> = model
        .columns
        .iter()
        .zip(&model.attnums)
        .map(|(n, &a)| NewColumn { name: n.clone(), type_name: "text".into(), attnum: Some(a).filter(|_| known) })
        .collect();
    let old_view = rel.columns.clone();
    let (changes, view) = match columns::plan(&old_view, &new) {
        Ok(plan) => plan,
        // Ambiguous: the apply copies the table again (tested against a
        // real remote); here the change is not made.
        Err(_) => {
            (model.columns, model.attnums, model.rows) = before;
            model.covered.ambiguous += 1;
            return;
        }
    };
    model.covered.schema_changes += 1;
    for sql in columns::ddl(&rel.qualified, &old_view, &changes) {
        batch.statement_for(1, sql, vec![]);
    }
    *rel = state(&view, rel.full_identity);
}

async fn local_rows(instance: &Instance, model: &Model) -> Vec<Vec<Option<String>>> {
    let cols: Vec<String> = model.columns.iter().map(|c| format!("\"{c}\"")).collect();
    let result = instance.query(&format!("SELECT {} FROM public.t", cols.join(", ")), &[]).await.unwrap();
    let mut rows: Vec<Vec<Option<String>>> =
        result.rows.iter().map(|r| (0..cols.len()).map(|j| r.get::<Option<String>>(j)).collect()).collect();
    rows.sort();
    rows
}

async fn run(seed: u64, full: bool) -> Covered {
    let instance = Instance::start(InstanceOptions::in_memory()).await.unwrap();
    instance.exec("DROP TABLE IF EXISTS public.t; CREATE TABLE public.t (id text, c0 text, c1 text)").await.unwrap();
    if !full {
        instance.exec("ALTER TABLE public.t ADD PRIMARY KEY (id)").await.unwrap();
    }
    let mut rng = Rng(seed);
    let mut model = Model {
        columns: vec!["id".into(), "c0".into(), "c1".into()],
        attnums: vec![1, 2, 3],
        max_attnum: 3,
        rows: Vec::new(),
        next_column: 1,
        covered: Covered::default(),
    };
    let view: Vec<LocalColumn> = model
        .columns
        .iter()
        .enumerate()
        .map(|(i, n)| LocalColumn { name: n.clone(), type_name: "text".into(), attnum: Some(i as i16 + 1) })
        .collect();
    let mut rel = state(&view, full);
    let mut next_id = 0u64;
    for round in 0..40 {
        let mut batch = Batch::default();
        // Several remote transactions merged into one local commit.
        for _ in 0..1 + rng.below(4) {
            random_transaction(&mut rng, &mut model, &mut rel, &mut batch, &mut next_id);
        }
        model.covered.reordered += batch.reordered;
        let tx = instance.begin().await.unwrap();
        run_steps(&tx, batch.take_steps()).await.unwrap_or_else(|e| panic!("seed {seed} round {round}: {e}"));
        tx.commit().await.unwrap();
        let mut expected = model.rows.clone();
        expected.sort();
        let got = local_rows(&instance, &model).await;
        assert_eq!(got.len(), expected.len(), "seed {seed} round {round}: row count");
        assert_eq!(got, expected, "seed {seed} round {round}");
    }
    instance.stop().await.unwrap();
    model.covered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_changes_match_row_by_row_application() {
    let mut total = Covered::default();
    for seed in 1..=6 {
        for covered in [run(seed, false).await, run(seed + 100, true).await] {
            total.copies += covered.copies;
            total.key_changes += covered.key_changes;
            total.unchanged_toast += covered.unchanged_toast;
            total.schema_changes += covered.schema_changes;
            total.ambiguous += covered.ambiguous;
            total.truncates += covered.truncates;
            total.reordered += covered.reordered;
        }
    }
    let t = &total;
    assert!(
        t.copies > 0
            && t.key_changes > 0
            && t.unchanged_toast > 0
            && t.schema_changes > 10
            && t.ambiguous > 0
            && t.truncates > 0
            && t.reordered > 10,
        "{total:?}"
    );
}
