"""The side-by-side app: the comparison engine, its Gradio page and its figures."""
