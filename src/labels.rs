//! Closed sets of labels: metric label values, serde names and stored text come from one
//! table, so they cannot drift apart.

/// Declares an enum whose variants are snake_case labels, with `ALL` (every variant, in
/// declaration order), `as_str`, `parse` and `Display`, all from strum's one table.
macro_rules! label_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $($(#[$variant_meta:meta])* $variant:ident),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(
            Debug,
            Clone,
            Copy,
            PartialEq,
            Eq,
            Hash,
            PartialOrd,
            Ord,
            serde::Serialize,
            serde::Deserialize,
            strum::IntoStaticStr,
            strum::EnumString,
            strum::VariantArray,
        )]
        #[serde(rename_all = "snake_case")]
        #[strum(serialize_all = "snake_case")]
        $vis enum $name {
            $($(#[$variant_meta])* $variant),+
        }

        #[allow(dead_code)]
        impl $name {
            /// Every label, in declaration order.
            pub const ALL: &'static [$name] = <$name as strum::VariantArray>::VARIANTS;

            /// The label as exported and stored.
            pub fn as_str(self) -> &'static str {
                self.into()
            }

            /// The variant a label names.
            pub fn parse(text: &str) -> Option<$name> {
                text.parse().ok()
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

pub(crate) use label_enum;

#[cfg(test)]
mod tests {
    label_enum! {
        /// A test set.
        enum Colour {
            DarkRed,
            Green,
        }
    }

    #[test]
    fn labels_round_trip_through_text_and_serde() {
        for colour in Colour::ALL {
            assert_eq!(Colour::parse(colour.as_str()), Some(*colour));
            let json = serde_json::to_string(colour).expect("serialises");
            assert_eq!(json, format!("\"{colour}\""));
        }
        assert_eq!(Colour::DarkRed.as_str(), "dark_red");
        assert_eq!(Colour::parse("blue"), None);
    }
}
