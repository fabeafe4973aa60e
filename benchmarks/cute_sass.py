"""`python -m benchmarks.cute_sass` runs `python -m cute_kernels.sass` (the compile-only SASS tool
moved next to the kernels it inspects; this name stays for the commands recorded in results/)."""

from cute_kernels.sass import main

if __name__ == "__main__":
    main()
