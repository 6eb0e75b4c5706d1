//! A row filter as SQL, from the trees Postgres keeps for it:
//!
//! - `pgpipe.row_filter_sql(filter pg_node_tree, tbl regclass, alias text)`: a filter tree
//!   (from `pgpipe.check_row_filter` at subscribe, or the `prqual` of the table's entry in
//!   pgpipe's publication) as SQL whose column references are qualified by `alias`:
//!   `new.total > 100::numeric` for the WHEN clause of an INSERT trigger, `old.` and
//!   `new.` for the UPDATE triggers, `t.` for a snapshot's query.
//! - `pgpipe.when_filter_sql(when pg_node_tree, tbl regclass, alias text)`: the filter
//!   inside the WHEN clause of one of the capture triggers that `pgpipe.create_row_triggers`
//!   made (`(filter) IS TRUE`, alone or in an AND with NOT), as above; NULL when the tree
//!   has no such shape. Postgres keeps the WHEN clause current (a renamed column is
//!   printed by its new name), unlike the text stored in `pgpipe.subscription`.
//!
//! An empty `alias` leaves the columns unqualified (`pgpipe.subscriptions."where"`).
//! Both are Postgres's own deparser (`deparse_expression` with a context naming the table
//! `alias`), so the text means exactly the tree: operators and functions are printed
//! schema-qualified where the caller's search_path would not find them.
//!
//! Internal: EXECUTE is revoked from PUBLIC (a pg_node_tree can only come from the
//! catalogs, but nobody needs to call these but pgpipe's own functions).

use std::ffi::{c_char, CStr};

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{is_a, PgList};

/// The range table entry of a trigger's WHEN clause that stands for NEW (OLD is 1, the
/// only entry of the deparse context).
const NEW_VARNO: i32 = 2;

function_info_v1!(pg_finfo_pgpipe_row_filter_sql);
function_info_v1!(pg_finfo_pgpipe_when_filter_sql);

/// `pgpipe.row_filter_sql(filter pg_node_tree, tbl regclass, alias text) RETURNS text`,
/// STRICT.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn pgpipe_row_filter_sql(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: called by the fmgr as the STRICT function above.
    unsafe {
        let (node, relid, alias) = arguments(fcinfo);
        pg_sys::Datum::from(pg_sys::cstring_to_text(deparse(node, relid, alias)))
    }
}

/// `pgpipe.when_filter_sql(when pg_node_tree, tbl regclass, alias text) RETURNS text`,
/// STRICT; NULL when `when` holds no `(filter) IS TRUE`.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn pgpipe_when_filter_sql(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: called by the fmgr as the STRICT function above; `isnull` is the result's
    // null flag.
    unsafe {
        let (when, relid, alias) = arguments(fcinfo);
        match matched_filter(when) {
            Some(filter) => {
                // The filter as one row: NEW's columns as OLD's (the context's table).
                pg_sys::ChangeVarNodes(filter, NEW_VARNO, 1, 0);
                pg_sys::Datum::from(pg_sys::cstring_to_text(deparse(filter, relid, alias)))
            }
            None => {
                (*fcinfo).isnull = true;
                pg_sys::Datum::from(0usize)
            }
        }
    }
}

/// The arguments both functions take: the tree (read back into nodes), the table and the
/// alias (a C string).
///
/// # Safety
/// `fcinfo` is the call of a STRICT function of (pg_node_tree, regclass, text): all three
/// arguments are set and not null.
unsafe fn arguments(
    fcinfo: pg_sys::FunctionCallInfo,
) -> (*mut pg_sys::Node, pg_sys::Oid, *const c_char) {
    // SAFETY: see the contract; the first and third are varlenas, the second an oid.
    unsafe {
        let args = (*fcinfo).args.as_slice(3);
        let tree = pg_sys::text_to_cstring(args[0].value.cast_mut_ptr());
        let relid = pg_sys::Oid::from(args[1].value.value() as u32);
        let alias = pg_sys::text_to_cstring(args[2].value.cast_mut_ptr());
        (
            pg_sys::stringToNode(tree) as *mut pg_sys::Node,
            relid,
            alias,
        )
    }
}

/// The first `(filter) IS TRUE` in `node`, looking through AND, OR and NOT: each WHEN
/// clause of `pgpipe.create_row_triggers` tests the same filter, on OLD or on NEW.
///
/// # Safety
/// `node` is null or a node tree.
unsafe fn matched_filter(node: *mut pg_sys::Node) -> Option<*mut pg_sys::Node> {
    // SAFETY: nodes are checked by tag before they are cast.
    unsafe {
        if node.is_null() {
            return None;
        }
        if is_a(node, pg_sys::NodeTag::T_BooleanTest) {
            let test = node as *mut pg_sys::BooleanTest;
            return ((*test).booltesttype == pg_sys::BoolTestType::IS_TRUE)
                .then(|| (*test).arg as *mut pg_sys::Node);
        }
        if is_a(node, pg_sys::NodeTag::T_BoolExpr) {
            let args = PgList::<pg_sys::Node>::from_pg((*(node as *mut pg_sys::BoolExpr)).args);
            return args.iter_ptr().find_map(|arg| matched_filter(arg));
        }
        None
    }
}

/// # Safety
/// `node` is an expression on the table `relid` (varno 1), `alias` a C string.
unsafe fn deparse(
    node: *mut pg_sys::Node,
    relid: pg_sys::Oid,
    alias: *const c_char,
) -> *const c_char {
    // SAFETY: see the contract; the context has one range table entry (varno 1), the
    // table, named `alias` (or `t`, never printed, when it is empty).
    unsafe {
        let qualified = !CStr::from_ptr(alias).is_empty();
        let name = if qualified { alias } else { c"t".as_ptr() };
        let context = pg_sys::deparse_context_for(name, relid);
        // forceprefix: every column as alias.column; no implicit casts shown.
        pg_sys::deparse_expression(node, context, qualified, false)
    }
}
