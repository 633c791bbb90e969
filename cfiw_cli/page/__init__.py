"""What `cfiw analyze` writes on its pages beyond the tables: the summary and the token explorer."""
