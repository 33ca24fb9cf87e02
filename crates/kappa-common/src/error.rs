//! Errors that know their SQLSTATE.
//!
//! Three kinds, kept apart: the user's mistake (bad SQL, unknown name, wrong type, constraint
//! violated), something not supported yet (always 0A000 and names the construct), and internal
//! failures (XX000: a bug or an environment problem, never the user's fault).

use datafusion::error::DataFusionError;

pub type Result<T, E = KappaError> = std::result::Result<T, E>;

/// A Postgres SQLSTATE code, five characters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SqlState(pub &'static str);

impl SqlState {
    pub const SYNTAX_ERROR: Self = Self("42601");
    pub const SYNTAX_OR_ACCESS_RULE: Self = Self("42000");
    pub const UNDEFINED_TABLE: Self = Self("42P01");
    pub const UNDEFINED_COLUMN: Self = Self("42703");
    pub const UNDEFINED_FUNCTION: Self = Self("42883");
    pub const DUPLICATE_TABLE: Self = Self("42P07");
    pub const DUPLICATE_COLUMN: Self = Self("42701");
    pub const DATATYPE_MISMATCH: Self = Self("42804");
    pub const INVALID_TABLE_DEFINITION: Self = Self("42P16");
    pub const WRONG_OBJECT_TYPE: Self = Self("42809");
    pub const DEPENDENT_OBJECTS_STILL_EXIST: Self = Self("2BP01");
    pub const UNIQUE_VIOLATION: Self = Self("23505");
    pub const NOT_NULL_VIOLATION: Self = Self("23502");
    pub const FEATURE_NOT_SUPPORTED: Self = Self("0A000");
    pub const INVALID_TEXT_REPRESENTATION: Self = Self("22P02");
    pub const DIVISION_BY_ZERO: Self = Self("22012");
    pub const NUMERIC_VALUE_OUT_OF_RANGE: Self = Self("22003");
    pub const DATA_EXCEPTION: Self = Self("22000");
    pub const BAD_COPY_FORMAT: Self = Self("22P04");
    pub const INVALID_PARAMETER_VALUE: Self = Self("22023");
    pub const DATETIME_FIELD_OVERFLOW: Self = Self("22008");
    pub const PROTOCOL_VIOLATION: Self = Self("08P01");
    pub const INVALID_TRANSACTION_STATE: Self = Self("25000");
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: Self = Self("55000");
    pub const INTERNAL_ERROR: Self = Self("XX000");
    pub const DATA_CORRUPTED: Self = Self("XX001");
    pub const DISK_FULL: Self = Self("53100");
    pub const IO_ERROR: Self = Self("58030");
    pub const QUERY_CANCELED: Self = Self("57014");
    pub const PROGRAM_LIMIT_EXCEEDED: Self = Self("54000");
    pub const INVALID_CURSOR_NAME: Self = Self("34000");
    pub const DUPLICATE_CURSOR: Self = Self("42P03");
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum KappaError {
    /// The user's input is wrong; the message says what to fix.
    #[error("{message}")]
    User { state: SqlState, message: String },
    /// Valid SQL that Kappa cannot run yet. The message names the construct.
    #[error("{0} is not supported yet")]
    NotSupported(String),
    /// A bug or an environment failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl KappaError {
    pub fn user(state: SqlState, message: impl Into<String>) -> Self {
        Self::User {
            state,
            message: message.into(),
        }
    }

    pub fn not_supported(what: impl Into<String>) -> Self {
        Self::NotSupported(what.into())
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::Internal(message.into())
    }

    pub fn sqlstate(&self) -> SqlState {
        match self {
            Self::User { state, .. } => *state,
            Self::NotSupported(_) => SqlState::FEATURE_NOT_SUPPORTED,
            Self::Internal(_) => SqlState::INTERNAL_ERROR,
        }
    }
}

impl From<DataFusionError> for KappaError {
    /// Maps DataFusion's errors to SQLSTATEs by kind and, where DataFusion has only one kind
    /// for many causes (planning errors), by the shape of its message.
    fn from(e: DataFusionError) -> Self {
        let root = e.find_root();
        if let DataFusionError::External(inner) = root
            && let Some(k) = inner.downcast_ref::<KappaError>()
        {
            return match k {
                Self::User { state, message } => Self::user(*state, message.clone()),
                Self::NotSupported(m) => Self::NotSupported(m.clone()),
                Self::Internal(m) => Self::Internal(m.clone()),
            };
        }
        classify_datafusion_message(&root.to_string())
    }
}

impl From<datafusion::arrow::error::ArrowError> for KappaError {
    fn from(e: datafusion::arrow::error::ArrowError) -> Self {
        classify_datafusion_message(&e.to_string())
    }
}

fn strip_prefixes(msg: &str) -> &str {
    let mut m = msg;
    for p in [
        "Error during planning: ",
        "SQL error: ",
        "Schema error: ",
        "Arrow error: ",
        "Execution error: ",
        "This feature is not implemented: ",
        "Invalid argument error: ",
        "Compute error: ",
        "Cast error: ",
        "Parser error: ",
        "Optimizer rule 'type_coercion' failed\ncaused by\n",
    ] {
        while let Some(rest) = m.strip_prefix(p) {
            m = rest;
        }
    }
    m.trim()
}

fn classify_datafusion_message(full: &str) -> KappaError {
    let msg = strip_prefixes(full).to_string();
    let has = |s: &str| full.contains(s);
    let state = if has("Divide by zero") || has("division by zero") {
        SqlState::DIVISION_BY_ZERO
    } else if has("table") && (has("not found") || has("doesn't exist")) {
        SqlState::UNDEFINED_TABLE
    } else if has("No field named") || has("not found in schema") || has("Ambiguous reference") {
        SqlState::UNDEFINED_COLUMN
    } else if has("Invalid function") || has("No function matches") {
        SqlState::UNDEFINED_FUNCTION
    } else if has("Cannot cast string") || has("Cannot parse") || has("Parser error") {
        SqlState::INVALID_TEXT_REPRESENTATION
    } else if has("Overflow") || has("overflow") || has("out of range") {
        SqlState::NUMERIC_VALUE_OUT_OF_RANGE
    } else if has("type_coercion")
        || has("Cannot infer common")
        || has("Cannot coerce")
        || has("cannot be cast")
        || has("Unsupported CAST")
        || has("Cannot automatically convert")
        || has("does not support")
        || has("must be Boolean")
        || has("non-boolean predicate")
        || has("is not a valid")
        || has("Failed to coerce")
        || has("signature")
    {
        SqlState::DATATYPE_MISMATCH
    } else if has("SQL error: ParserError") || has("sql parser error") {
        SqlState::SYNTAX_ERROR
    } else if has("This feature is not implemented") || has("Unsupported") {
        let mut what = msg.as_str();
        for suffix in [
            " is not supported yet",
            " not supported yet",
            " is not supported",
            " not supported",
        ] {
            what = what.strip_suffix(suffix).unwrap_or(what);
        }
        return KappaError::NotSupported(what.to_string());
    } else if has("Error during planning") || has("Schema error") {
        SqlState::SYNTAX_OR_ACCESS_RULE
    } else if has("Execution error") || has("Arrow error") || has("Cast error") {
        SqlState::DATA_EXCEPTION
    } else {
        return KappaError::Internal(msg);
    };
    KappaError::user(state, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datafusion_errors_get_sqlstates() {
        let e: KappaError =
            DataFusionError::Plan("table 'datafusion.public.nope' not found".into()).into();
        assert_eq!(e.sqlstate(), SqlState::UNDEFINED_TABLE);
        let e: KappaError = DataFusionError::SchemaError(
            Box::new(datafusion::common::SchemaError::FieldNotFound {
                field: Box::new(datafusion::common::Column::from_name("zz")),
                valid_fields: vec![],
            }),
            Box::new(None),
        )
        .into();
        assert_eq!(e.sqlstate(), SqlState::UNDEFINED_COLUMN);
        let e: KappaError =
            DataFusionError::NotImplemented("Unsupported SQL type Foo".into()).into();
        assert_eq!(e.sqlstate(), SqlState::FEATURE_NOT_SUPPORTED);
    }
}
