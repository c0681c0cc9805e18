//! A small owned XML tree for SOAP bodies.
//!
//! Why a tree of our own instead of serde: vim25 objects are polymorphic (`xsi:type`), and a
//! device we edit must go back to the server exactly as it was read (vcsim 0.24.2 drops the
//! connection when `deviceInfo` is missing, and real vCenter rejects unknown reorderings).
//! Keeping the read-back element and re-serialising it is the simplest faithful way.
//! `xsi:type` is resolved by namespace URI, never by prefix: vcsim writes
//! `XMLSchema-instance:type` inside property values and `xsi:type` in fault details.

use quick_xml::events::{BytesStart, Event};
use quick_xml::name::{Namespace, QName, ResolveResult};
use quick_xml::reader::NsReader;

const XSI_NS: &[u8] = b"http://www.w3.org/2001/XMLSchema-instance";
const XSD_NS: &[u8] = b"http://www.w3.org/2001/XMLSchema";

/// An element: local name, resolved `xsi:type`, other attributes, text and children.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Element {
    /// Local name (namespace dropped: everything we read is vim25 or SOAP envelope).
    pub name: String,
    /// Local part of `xsi:type`, resolved by namespace URI.
    pub xsi_type: Option<String>,
    /// True when the `xsi:type` value is in the XML Schema namespace (`xsd:string`, ...).
    pub xsi_type_is_xsd: bool,
    /// Attributes other than namespace declarations and `xsi:*` (e.g. `type` on a MoRef).
    pub attrs: Vec<(String, String)>,
    /// Unescaped character data directly inside this element.
    pub text: String,
    pub children: Vec<Element>,
}

impl Element {
    pub fn new(name: &str) -> Self {
        Element {
            name: name.to_string(),
            ..Default::default()
        }
    }

    /// A leaf element with text.
    pub fn leaf(name: &str, text: impl Into<String>) -> Self {
        Element {
            name: name.to_string(),
            text: text.into(),
            ..Default::default()
        }
    }

    pub fn with_type(mut self, xsi_type: &str) -> Self {
        self.xsi_type = Some(xsi_type.to_string());
        self
    }

    pub fn push(mut self, child: Element) -> Self {
        self.children.push(child);
        self
    }

    /// The vim type: `xsi:type` if present, else the element name.
    pub fn type_name(&self) -> &str {
        self.xsi_type.as_deref().unwrap_or(&self.name)
    }

    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    pub fn child_mut(&mut self, name: &str) -> Option<&mut Element> {
        self.children.iter_mut().find(|c| c.name == name)
    }

    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// Follows a path of child names.
    pub fn path(&self, path: &[&str]) -> Option<&Element> {
        let mut cur = self;
        for p in path {
            cur = cur.child(p)?;
        }
        Some(cur)
    }

    /// Text of a child, if the child exists.
    pub fn text_of(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.as_str())
    }

    pub fn parse_child<T: std::str::FromStr>(&self, name: &str) -> Option<T> {
        self.text_of(name).and_then(|t| t.trim().parse().ok())
    }

    pub fn bool_child(&self, name: &str) -> Option<bool> {
        self.text_of(name)
            .map(|t| t.trim() == "true" || t.trim() == "1")
    }

    /// Replaces the first child with that name, or inserts the new child before the first
    /// child whose name appears in `before` (to keep the schema's element order), or appends.
    pub fn set_child(&mut self, child: Element, before: &[&str]) {
        if let Some(c) = self.children.iter_mut().find(|c| c.name == child.name) {
            *c = child;
            return;
        }
        let pos = self
            .children
            .iter()
            .position(|c| before.contains(&c.name.as_str()))
            .unwrap_or(self.children.len());
        self.children.insert(pos, child);
    }

    /// Serialises this element (renamed to `name` if given). `xsi:type` uses the `xsi`
    /// prefix, which every envelope we send declares, together with `xsd`.
    pub fn to_xml(&self, name: Option<&str>) -> String {
        let mut out = String::new();
        self.write(&mut out, name);
        out
    }

    fn write(&self, out: &mut String, name: Option<&str>) {
        let name = name.unwrap_or(&self.name);
        out.push('<');
        out.push_str(name);
        if let Some(t) = &self.xsi_type {
            out.push_str(" xsi:type=\"");
            if self.xsi_type_is_xsd {
                out.push_str("xsd:");
            }
            out.push_str(&escape(t));
            out.push('"');
        }
        for (k, v) in &self.attrs {
            out.push(' ');
            out.push_str(k);
            out.push_str("=\"");
            out.push_str(&escape(v));
            out.push('"');
        }
        if self.text.is_empty() && self.children.is_empty() {
            out.push_str("/>");
            return;
        }
        out.push('>');
        out.push_str(&escape(&self.text));
        for c in &self.children {
            c.write(out, None);
        }
        out.push_str("</");
        out.push_str(name);
        out.push('>');
    }
}

/// Escapes text and attribute values.
pub fn escape(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

/// Parses a whole document and returns its root element.
pub fn parse(doc: &str) -> Result<Element, String> {
    let mut reader = NsReader::from_str(doc);
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    loop {
        let ev = reader
            .read_event()
            .map_err(|e| format!("at byte {}: {e}", reader.buffer_position()))?;
        match ev {
            Event::Start(start) => stack.push(element_from(&reader, &start)?),
            Event::Empty(start) => {
                let el = element_from(&reader, &start)?;
                attach(&mut stack, &mut root, el);
            }
            Event::End(_) => {
                let el = stack
                    .pop()
                    .ok_or_else(|| "unbalanced end tag".to_string())?;
                attach(&mut stack, &mut root, el);
            }
            Event::Text(t) => {
                if let Some(top) = stack.last_mut() {
                    let s = t.unescape().map_err(|e| format!("bad text: {e}"))?;
                    top.text.push_str(&s);
                }
            }
            Event::CData(t) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&String::from_utf8_lossy(&t.into_inner()));
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !stack.is_empty() {
        return Err("document ended inside an element".into());
    }
    let mut root = root.ok_or_else(|| "empty document".to_string())?;
    trim_layout(&mut root);
    Ok(root)
}

/// Drops whitespace-only text of elements that have children (indentation), so a tree
/// read back serialises the same way whether or not the server pretty-printed it.
fn trim_layout(el: &mut Element) {
    if !el.children.is_empty() && el.text.trim().is_empty() {
        el.text.clear();
    }
    for c in &mut el.children {
        trim_layout(c);
    }
}

fn attach(stack: &mut [Element], root: &mut Option<Element>, el: Element) {
    match stack.last_mut() {
        Some(parent) => parent.children.push(el),
        None => *root = Some(el),
    }
}

fn element_from(reader: &NsReader<&[u8]>, start: &BytesStart) -> Result<Element, String> {
    let name = String::from_utf8_lossy(start.local_name().as_ref()).into_owned();
    let mut el = Element::new(&name);
    for attr in start.attributes() {
        let attr = attr.map_err(|e| format!("bad attribute in <{name}>: {e}"))?;
        let key = attr.key;
        if key.as_ref() == b"xmlns" || key.prefix().is_some_and(|p| p.as_ref() == b"xmlns") {
            continue;
        }
        let value = attr
            .unescape_value()
            .map_err(|e| format!("bad attribute value in <{name}>: {e}"))?
            .into_owned();
        let (ns, local) = reader.resolve_attribute(key);
        match ns {
            ResolveResult::Bound(Namespace(uri)) if uri == XSI_NS => {
                if local.as_ref() == b"type" {
                    let (tns, tlocal) = reader.resolve(QName(value.as_bytes()), false);
                    el.xsi_type_is_xsd =
                        matches!(tns, ResolveResult::Bound(Namespace(u)) if u == XSD_NS);
                    el.xsi_type = Some(String::from_utf8_lossy(tlocal.as_ref()).into_owned());
                }
            }
            _ => el
                .attrs
                .push((String::from_utf8_lossy(local.as_ref()).into_owned(), value)),
        }
    }
    Ok(el)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xsi_type_resolved_by_namespace_not_prefix() {
        let doc = r#"<r xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" xmlns:q="http://www.w3.org/2001/XMLSchema-instance" xmlns:xsd="http://www.w3.org/2001/XMLSchema">
          <a XMLSchema-instance:type="VirtualCdrom"><key>3000</key></a>
          <b q:type="xsd:int">5</b>
          <c xmlns:xsi="urn:not-xsi" xsi:type="Nope">x</c>
          <obj type="VirtualMachine">vm-1</obj>
        </r>"#;
        let r = parse(doc).unwrap();
        assert_eq!(r.children[0].xsi_type.as_deref(), Some("VirtualCdrom"));
        assert!(!r.children[0].xsi_type_is_xsd);
        assert_eq!(r.children[1].xsi_type.as_deref(), Some("int"));
        assert!(r.children[1].xsi_type_is_xsd);
        assert_eq!(
            r.children[2].xsi_type, None,
            "xsi bound to another URI is not xsi"
        );
        assert_eq!(r.children[3].attr("type"), Some("VirtualMachine"));
        assert_eq!(r.children[3].text, "vm-1");
    }

    #[test]
    fn round_trip_keeps_order_types_and_escapes() {
        let doc = r#"<device xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:type="VirtualCdrom"><key>3002</key><deviceInfo><label>CD &amp; DVD</label><summary>ISO [ds] a&lt;b.iso</summary></deviceInfo><backing xsi:type="VirtualCdromIsoBackingInfo"><fileName>[ds] a&lt;b.iso</fileName></backing></device>"#;
        let el = parse(doc).unwrap();
        let out = el.to_xml(None);
        assert_eq!(
            parse(&out.replace(
                "<device ",
                "<device xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" "
            ))
            .unwrap(),
            el
        );
        assert!(out.starts_with("<device xsi:type=\"VirtualCdrom\"><key>3002</key><deviceInfo>"));
        assert!(out.contains("a&lt;b.iso"));
    }

    #[test]
    fn set_child_keeps_schema_order() {
        let mut el = Element::new("d")
            .push(Element::leaf("key", "1"))
            .push(Element::leaf("controllerKey", "200"));
        el.set_child(
            Element::leaf("backing", "b"),
            &["connectable", "controllerKey"],
        );
        let names: Vec<_> = el.children.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["key", "backing", "controllerKey"]);
        el.set_child(Element::leaf("backing", "c"), &[]);
        assert_eq!(el.text_of("backing"), Some("c"));
    }

    #[test]
    fn malformed_is_an_error() {
        assert!(parse("<a><b></a>").is_err());
        assert!(parse("").is_err());
    }
}
