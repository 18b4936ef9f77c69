"""What the test run collects besides the tests: the doctests of the product packages
(pyproject's --doctest-modules), never a program that runs when imported."""

# The model image's server (copied into the image by its Containerfile): a program, not a
# module of the tests.
collect_ignore_glob = ["e2e/node/images/*"]
