# `unicorn-shim check` runs this to see a Unicorn (or Puma) config as the server sees it:
#
#   ruby unicorn_shim_eval.rb CONFIG_FILE [RACK_ENV]
#   ruby unicorn_shim_eval.rb --puma CONFIG_FILE [RACK_ENV]
#
# run as the unit's user, in the app directory, with the environment the shim
# gives its masters. It loads the config with Unicorn's own Configurator (the
# same call Unicorn::HttpServer makes) and prints one line, "unicorn-shim-eval:
# JSON". It never starts a server: nothing is bound, forked or exec'd except
# one short-lived child that runs before_exec to see what it does to the
# environment.
require "json"

module UnicornShimEval
  MARK = "unicorn-shim-eval: "
  HOOKS = %i[before_fork after_fork before_exec after_worker_ready after_worker_exit].freeze
  ENV_READS = {}
  @config_file = nil

  class << self
    attr_accessor :config_file
  end

  def self.report(hash)
    STDOUT.write(MARK + JSON.generate(hash) + "\n")
    STDOUT.flush
  end

  # Only the config's own reads count, not those of the libraries it loads.
  def self.saw(key, present, caller_path)
    return unless caller_path == config_file
    ENV_READS[key.to_s] = present unless ENV_READS.key?(key.to_s)
  end

  # Which environment variables the config reads, and whether they were set.
  module EnvWatch
    def [](key)
      value = super
      UnicornShimEval.saw(key, !value.nil?, caller_locations(1, 1).first&.path)
      value
    end

    def fetch(key, *args, &block)
      UnicornShimEval.saw(key, key?(key), caller_locations(1, 1).first&.path)
      super
    end
  end

  # Records the path given to working_directory as Unicorn expands it (before
  # its chdir, which would resolve a symlink).
  module WorkdirWatch
    attr_reader :shim_working_directory

    def working_directory(path)
      @shim_working_directory = File.expand_path(path)
      super
    end
  end

  # The lines of the block or lambda a hook was given, for a look at what it does.
  def self.source(hook)
    file, line = hook.source_location
    return nil unless file && File.readable?(file)
    lines = File.readlines(file)
    last = block_end(file, line) || lines.size
    lines[(line - 1)...last].join
  rescue StandardError, SyntaxError
    nil
  end

  def self.block_end(file, line)
    return nil unless defined?(RubyVM::AbstractSyntaxTree)
    queue = [RubyVM::AbstractSyntaxTree.parse_file(file)]
    until queue.empty?
      node = queue.shift
      next unless node.is_a?(RubyVM::AbstractSyntaxTree::Node)
      if %i[ITER LAMBDA].include?(node.type) && node.first_lineno == line
        return node.last_lineno
      end
      queue.concat(node.children)
    end
    nil
  end

  # What before_exec leaves in BUNDLE_GEMFILE: run it in a child that exits at once.
  def self.before_exec_gemfile(hook)
    reader, writer = IO.pipe
    pid = fork do
      reader.close
      begin
        server = Struct.new(:logger).new(Logger.new(IO::NULL))
        hook.call(server)
        writer.write(JSON.generate("gemfile" => ENV["BUNDLE_GEMFILE"]))
      rescue Exception => e # rubocop:disable Lint/RescueException
        writer.write(JSON.generate("error" => "#{e.class}: #{e.message}"))
      end
      writer.close
      exit!(0)
    end
    writer.close
    text = reader.read
    Process.wait(pid)
    JSON.parse(text)
  rescue StandardError => e
    { "error" => "#{e.class}: #{e.message}" }
  end

  def self.path(value)
    value.is_a?(String) ? File.expand_path(value) : nil
  end

  def self.prepare(config_file, rack_env)
    self.config_file = config_file
    ENV["RACK_ENV"] = rack_env if rack_env && !rack_env.empty?
    ENV["RACK_ENV"] ||= "development"
    ENV.singleton_class.prepend(EnvWatch)
    $stdout = $stderr # what the config prints must not mix with the report
  end

  # Runs the server's own loading of the config: [error, syntax error], nil when it loaded.
  def self.load_config
    yield
    [nil, nil]
  rescue SyntaxError => e
    syntax_error = e.message.lines.first.to_s.strip
    ["SyntaxError: #{syntax_error}", syntax_error]
  rescue Exception => e # rubocop:disable Lint/RescueException
    where = (e.backtrace || []).find { |l| l.start_with?(config_file) }
    ["#{e.class}: #{e.message}#{where ? " (#{where})" : ''}", nil]
  end

  def self.run(config_file, rack_env)
    prepare(config_file, rack_env)
    begin
      require "unicorn"
    rescue LoadError => e
      return report("cannot" => "Unicorn cannot be loaded by #{RbConfig.ruby}: #{e.message}")
    end
    Unicorn::Configurator.prepend(WorkdirWatch)
    config = Unicorn::Configurator.allocate
    # What Unicorn::HttpServer.new does with `-c FILE`.
    error, syntax_error = load_config { config.send(:initialize, config_file: config_file, use_defaults: true) }
    set = config.set
    unless set.is_a?(Hash)
      return report("cannot" => "loading #{config_file} failed: #{error}")
    end
    hooks = {}
    HOOKS.each do |name|
      hook = set[name]
      next unless hook.is_a?(Proc)
      default = Unicorn::Configurator::DEFAULTS[name].equal?(hook)
      hooks[name] = { "default" => default, "source" => default ? nil : source(hook),
                      "location" => hook.source_location&.join(":") }
    end
    if hooks[:before_exec] && !hooks[:before_exec]["default"]
      hooks[:before_exec]["effect"] = before_exec_gemfile(set[:before_exec])
    end
    value = ->(key) { set[key] == :unset ? nil : set[key] }
    report(
      "unicorn_version" => Unicorn::Const::UNICORN_VERSION,
      "error" => error,
      "syntax_error" => syntax_error,
      "ruby_version" => RUBY_VERSION,
      "config_file" => config_file,
      "working_directory" => config.shim_working_directory,
      "cwd" => Dir.pwd,
      "pid" => path(value.(:pid)),
      "listeners" => Array(value.(:listeners)).map(&:to_s),
      "worker_processes" => value.(:worker_processes),
      "timeout" => value.(:timeout),
      "preload_app" => value.(:preload_app),
      "user" => value.(:user),
      "stderr_path" => path(value.(:stderr_path)),
      "stdout_path" => path(value.(:stdout_path)),
      "hooks" => hooks,
      "readiness_hook" => !!defined?(UnicornShim::ReadyHook),
      "env_reads" => ENV_READS,
    )
  end

  # Puma's config, as Puma::CLI loads it: Puma::Configuration with the -C file.
  def self.run_puma(config_file, rack_env)
    prepare(config_file, rack_env)
    begin
      require "puma"
      require "puma/configuration"
    rescue LoadError => e
      return report("cannot" => "Puma cannot be loaded by #{RbConfig.ruby}: #{e.message}")
    end
    files = config_file.to_s.empty? ? [] : [config_file]
    conf = Puma::Configuration.new(config_files: files)
    error, syntax_error = load_config { conf.load }
    options = conf.options
    report(
      "puma_version" => Puma::Const::PUMA_VERSION,
      "error" => error,
      "syntax_error" => syntax_error,
      "ruby_version" => RUBY_VERSION,
      "cwd" => Dir.pwd,
      "pidfile" => path(options[:pidfile]),
      "workers" => options[:workers],
      "fork_worker" => !!options[:fork_worker],
      "directory" => path(options[:directory]),
      "readiness_hook" => !!defined?(UnicornShimPuma),
      "env_reads" => ENV_READS,
    )
  end
end

if ARGV[0] == "--puma"
  UnicornShimEval.run_puma(ARGV[1], ARGV[2])
else
  UnicornShimEval.run(ARGV[0], ARGV[1])
end
