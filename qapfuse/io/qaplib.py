"""QAPLIB ``.dat`` / ``.sln`` I/O. PLACEHOLDER: being written."""
