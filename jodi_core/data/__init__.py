"""Training data for Jodi: a synthetic multi-domain world with exact labels and a Joint-1.6M layout reader.

Submodules are imported on use (``from jodi_core.data.synthetic import SyntheticWorld``) so that importing this
package stays cheap.
"""
